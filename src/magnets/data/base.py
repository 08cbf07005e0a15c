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

A datamodule is built by :func:`build_datamodule` from the ``data`` config
group's ``module``: its ``_target_`` (the class) and arguments, through
``hydra.utils.instantiate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, default_collate

from magnets.choices import DATAMODULES, SPLITS
from magnets.errors import ConfigError, UserError

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


def build_datamodule(cfg: Mapping[str, Any]) -> MediaLoaders:
    """The datamodule of the ``data`` config group: ``cfg['module']``'s ``_target_`` class with its other keys as
    arguments (``hydra.utils.instantiate``; the class is imported then, so image-only runs never import decord).

    A config saved before ``_target_`` existed (in an older checkpoint) names its class through ``cfg['name']``
    (:data:`magnets.choices.DATAMODULES`). A target that does not import or does not take the arguments is one
    :class:`ConfigError`; a user error of the datamodule itself (missing data) passes through as it is.
    """
    name, module = cfg["name"], cfg.get("module")
    if module is None:
        raise ConfigError("data.module", None, f"the arguments of {name}'s datamodule (null: {name} is pre-tokenized, no media)")
    arguments = dict(module)
    if "_target_" not in arguments and name in DATAMODULES:
        arguments["_target_"] = ".".join(DATAMODULES[name])
    if not isinstance(arguments.get("_target_"), str):
        raise ConfigError("data.module._target_", arguments.get("_target_"), DATAMODULE_TARGETS)
    try:
        return cast(MediaLoaders, instantiate(arguments, _convert_="all"))
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        cause = err.__cause__  # the constructor's own error, e.g. an argument it does not take, or the import's
        if isinstance(cause, ImportError) or cause is None:
            reason = "no such class to import"
        else:
            reason = " ".join(f"{type(cause).__name__}: {cause}".split())  # one line
        raise ConfigError("data.module._target_", arguments["_target_"], f"{DATAMODULE_TARGETS} ({reason})") from None


DATAMODULE_TARGETS = "a media datamodule class taking data.module's other keys, e.g. " + ", ".join(
    ".".join(path) for path in DATAMODULES.values()
)
