"""The media datamodule seam: every dataset of images or clips looks the same to the rest of the project.

A media datamodule is a ``LightningDataModule`` whose ``dataset(split)`` is a
map-style dataset of ``(x, label)``: ``x`` uint8 ``[C, H, W]`` (image) or
``[C, T, H, W]`` (clip), ``label`` an int. Tokenization, the tokenizer's
training, the classifier and FID iterate a ``DataLoader`` over it; nothing
loads a whole split into memory through this seam, and nothing outside the
datamodules knows whether an item is an image or a clip.

``media_info()`` describes the items for token shards' ``meta.json``
(``kind``: ``image`` or ``video``, and e.g. resolution, frames, stride, fps).

A file that cannot be decoded must never raise inside a DataLoader worker:
the dataset returns it as ``(zeros, UNREADABLE_LABEL)`` and
:func:`drop_unreadable`, the collate function of every loader here, leaves it
out of the batch. Tokenization counts and reports such items by name
(a dataset that can produce them has ``why_unreadable(index)``).

Datamodules are registered in :data:`DATAMODULES` by the ``data`` config
group's ``name`` and built by :func:`build_datamodule` from its ``module``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from magnets.choices import DATAMODULES, SPLITS
from magnets.errors import ConfigError

# The label of an item whose file could not be read (its media are zeros). Not -1: that is Kinetics' "no label" (its
# unlabelled test split), a real item.
UNREADABLE_LABEL = -2


@runtime_checkable
class MediaDataModule(Protocol):
    def dataset(self, split: str, augment: bool | None = None) -> Dataset:
        """Items ``(uint8 [C, H, W] or [C, T, H, W], int label)`` of ``split`` (one of :data:`SPLITS`).

        ``augment`` (default: ``split == "train"``) allows random views (e.g. a
        clip's temporal offset); ``False`` makes every read of an item the same.
        """
        ...

    def media_info(self) -> dict[str, Any]:
        """What an item is, for shard metadata: ``{"kind": "image" | "video", ...}``."""
        ...


class MediaLoaders(L.LightningDataModule):
    """The Lightning loaders of a media datamodule, built from its ``dataset(split)``, ``batch_size`` and ``num_workers``.

    Training shuffles and drops the last partial batch; evaluation walks the split in order.
    """

    batch_size: int
    num_workers: int
    media_info: Callable[[], dict[str, Any]]  # defined by every subclass (see MediaDataModule)

    def dataset(self, split: str, augment: bool | None = None) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=drop_unreadable,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def drop_unreadable(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(media, label)`` items into ``(uint8 [B, ...], int64 [B])``, leaving out items marked :data:`UNREADABLE_LABEL`.

    A batch whose items are all unreadable comes out empty (``B = 0``).
    """
    kept = [item for item in batch if int(item[1]) != UNREADABLE_LABEL]
    if not kept:
        return torch.empty((0, *batch[0][0].shape), dtype=batch[0][0].dtype), torch.empty(0, dtype=torch.int64)
    media, labels = default_collate(kept)
    return media, torch.as_tensor(labels, dtype=torch.int64)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError("split", split, SPLITS)


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 media in ``[0, 255]`` -> float32 in ``[0, 1]`` (the one home of this conversion)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 media from a media datamodule, got {x.dtype}")
    return x.float().div_(255)


# data.name -> (module, class); imported on first use so that image-only runs never import decord.
def build_datamodule(cfg: Mapping[str, Any]) -> MediaLoaders:
    """The datamodule named by ``cfg['name']``, built from ``cfg['module']`` (the ``data`` config group)."""
    name = cfg["name"]
    if name not in DATAMODULES:
        raise ConfigError("data.name", name, f"a dataset with media: {', '.join(sorted(DATAMODULES))}")
    if cfg.get("module") is None:
        raise ConfigError("data.module", None, f"the arguments of {name}'s datamodule (null: {name} is pre-tokenized, no media)")
    module_name, class_name = DATAMODULES[name]
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    return datamodule_class(**cfg["module"])
