"""Token shards: a directory of ``tokens.npy`` (uint16 ``[items, tokens]``), ``labels.npy`` and ``meta.json``.

Shards are written atomically: everything goes into a hidden temporary
directory beside the target, which is renamed into place only when complete,
so an interrupted write never leaves a directory that looks like a shard.
Readers check ``meta.json`` against what the model expects and refuse a
shard that does not match, naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from magnets.errors import MismatchError
from magnets.models.tokenizer import num_tokens

FORMAT_VERSION = 1


class ShardError(MismatchError):
    """A token shard is missing, incomplete, or does not match the model."""


@dataclass
class ShardMeta:
    """Contents of ``meta.json``."""

    dataset: str
    split: str
    count: int
    grid: list[int]  # token grid shape, [h, w] or [t, h, w]; tokens per item = prod(grid)
    codebook_size: int
    tokenizer_checkpoint: str
    tokenizer_sha256: str
    flip_augmented: bool
    created: str
    format_version: int = FORMAT_VERSION
    media: dict[str, Any] = field(default_factory=dict)  # the datamodule's media_info(): kind, resolution, frames, ...

    @property
    def tokens_per_item(self) -> int:
        return num_tokens(self.grid)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_shard(
    directory: str | Path,
    meta: ShardMeta,
    fill: Callable[[np.memmap, np.memmap], None],
) -> Path:
    """Write a shard atomically.

    ``fill(tokens, labels)`` writes into memmaps of shape ``[meta.count,
    tokens_per_item]`` (uint16) and ``[meta.count]`` (int64). Only when it
    returns are the files flushed and the directory renamed to ``directory``
    (replacing an older shard there).
    """
    target = Path(directory)
    if meta.codebook_size > 65536:
        raise ShardError(f"codebook_size={meta.codebook_size} does not fit uint16 tokens (max 65536)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shard is for everyone who can read its parent
    try:
        shape = (meta.count, meta.tokens_per_item)
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.uint16, shape=shape)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.int64, shape=shape[:1])
        fill(tokens, labels)
        tokens.flush()
        labels.flush()
        del tokens, labels
        (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
        # Swap: the old shard (if any) moves aside, the new one takes its name, the old one is removed.
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_meta(directory: str | Path) -> ShardMeta:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise ShardError(f"{directory} is not a token shard: {path.name} is missing (tokenize the split first: make tokenize)")
    try:
        fields = json.loads(path.read_text())
        return ShardMeta(**fields)
    except (json.JSONDecodeError, TypeError) as err:
        raise ShardError(f"{path} is not a valid shard meta.json ({err})") from err


def check_meta(meta: ShardMeta, directory: str | Path, expected: dict[str, object]) -> None:
    """Raise naming every field of ``meta`` that differs from ``expected``."""
    diffs = [
        f"{key}: shard has {getattr(meta, key)!r}, expected {value!r}"
        for key, value in expected.items()
        if getattr(meta, key) != value
    ]
    if diffs:
        raise ShardError(f"token shard {directory} does not match: " + "; ".join(diffs))


def open_shard(directory: str | Path, **expected: object) -> tuple[np.memmap, np.ndarray, ShardMeta]:
    """Tokens (read-only memmap ``[count, tokens]``), labels ``[count]`` and meta of a shard.

    ``expected`` names meta fields that must match, e.g.
    ``open_shard(d, codebook_size=512, grid=[8, 8])``.
    """
    meta = read_meta(directory)
    check_meta(meta, directory, expected)
    tokens = np.load(Path(directory) / "tokens.npy", mmap_mode="r")
    labels = np.load(Path(directory) / "labels.npy", mmap_mode="r")
    if tokens.dtype != np.uint16 or tokens.shape != (meta.count, meta.tokens_per_item):
        raise ShardError(
            f"{directory}/tokens.npy is {tokens.dtype} {list(tokens.shape)}, "
            f"meta.json says uint16 [{meta.count}, {meta.tokens_per_item}]"
        )
    if labels.shape != (meta.count,):
        raise ShardError(f"{directory}/labels.npy has shape {list(labels.shape)}, meta.json says [{meta.count}]")
    return tokens, labels, meta


class TokenDataset(Dataset):
    """Items of a shard as ``(tokens int64 [N], label int64)``."""

    def __init__(self, directory: str | Path, **expected: object) -> None:
        self.tokens, self.labels, self.meta = open_shard(directory, **expected)

    def __len__(self) -> int:
        return self.meta.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.tokens[index].astype(np.int64)), torch.tensor(int(self.labels[index]))


class SeededTokenBatches(IterableDataset):
    """Endless training batches where the batch of step ``s`` depends only on ``(seed, s)``.

    Epoch ``e`` visits the items in a permutation seeded by ``(seed, e)``;
    each of ``world_size`` processes takes its own slice of every global
    batch. Iteration starts at ``start_step()``, read when iteration begins,
    so a run resumed from a checkpoint sees exactly the batches the unbroken
    run would have seen.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seed: int,
        start_step: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = len(dataset) // (batch_size * world_size)
        self._order_epoch, self._order = -1, np.arange(0)  # the permutation of the epoch last asked for
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} items cannot fill one global batch of {batch_size} x {world_size} processes; "
                "lower the batch size"
            )

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices of this process's items at ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._order_epoch = epoch
        order = self._order
        start = (index * self.world_size + self.rank) * self.batch_size
        return np.sort(order[start : start + self.batch_size])  # sorted: sequential memmap reads

    def __iter__(self):
        step = self.start_step()
        while True:
            idx = self.batch_indices(step)
            tokens = torch.from_numpy(self.dataset.tokens[idx].astype(np.int64))  # [B, N]
            labels = torch.from_numpy(np.asarray(self.dataset.labels[idx], dtype=np.int64))  # [B]
            yield tokens, labels
            step += 1


class TokenDataModule(L.LightningDataModule):
    """Token shards ``<root>/<split>`` for ``train``, ``val`` and ``test``, checked against the model.

    Training batches are :class:`SeededTokenBatches`, resumable at any step;
    evaluation batches walk the split in order.
    """

    def __init__(
        self,
        root: str | Path,
        codebook_size: int,
        grid: list[int],
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.expected = {"codebook_size": codebook_size, "grid": list(grid)}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def dataset(self, split: str) -> TokenDataset:
        return TokenDataset(self.root / split, **self.expected)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches = SeededTokenBatches(
            self.dataset("train"),
            self.batch_size,
            self.seed,
            start_step=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        return DataLoader(batches, batch_size=None)  # already batched; one process reads (memmap)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
