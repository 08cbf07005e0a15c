"""Token shards: a directory of ``tokens.npy`` (uint16 ``[items, tokens]``), ``labels.npy`` and ``meta.json``.

A split is a directory of numbered shards, ``<split>/shard-00000/``,
``shard-00001/`` ... (``magnets.data.tokenization`` writes them), read as
one dataset: the shards' rows concatenated in shard order, each shard
memory-mapped. A split written as a single shard (``meta.json`` directly in
the split's directory, e.g. made by hand with :func:`write_shard`) reads the
same way.

Shards are written atomically: everything goes into a hidden temporary
directory beside the target, which is renamed into place only when complete,
so an interrupted write never leaves a directory that looks like a shard.
Readers check ``meta.json`` against what the model expects and refuse a
shard that does not match, naming the field, and refuse a split whose shards
are not all there or come from different tokenizations.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from magnets.errors import MismatchError
from magnets.models.tokenizer import num_tokens

FORMAT_VERSION = 2  # 2: the shard fields (shard, num_shards, items, split_items, unreadable)
SHARD_NAME = re.compile(r"shard-(\d{5,})")
# Fields every shard of one split shares: what was tokenized, how, and into how many shards.
SPLIT_FIELDS = (
    "dataset",
    "split",
    "grid",
    "codebook_size",
    "tokenizer_sha256",
    "flip_augmented",
    "media",
    "num_shards",
    "split_items",
)


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
    shard: int | None = None  # this shard's index in its split; None: the split as one shard (or the whole split's view)
    num_shards: int = 1  # shards of the split
    items: list[int] | None = None  # [start, end): the source items of the split this shard covers (None: not recorded)
    split_items: int | None = None  # source items in the whole split
    # Source items left out because they could not be read: {"index", "path", "reason"} each.
    unreadable: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_item(self) -> int:
        return num_tokens(self.grid)


def shard_name(index: int) -> str:
    """The directory name of a split's shard ``index``: ``shard-00000``."""
    return f"shard-{index:05d}"


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


def read_shard_meta(directory: str | Path) -> ShardMeta:
    """The ``meta.json`` of one shard directory."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise ShardError(f"{directory} is not a token shard: {path.name} is missing (tokenize the split first: make tokenize)")
    try:
        fields = json.loads(path.read_text())
        return ShardMeta(**fields)
    except (json.JSONDecodeError, TypeError) as err:
        raise ShardError(f"{path} is not a valid shard meta.json ({err})") from err


def shard_dirs(split_dir: str | Path) -> dict[int, Path]:
    """The numbered shard directories in ``split_dir`` by index (hidden temporaries of unfinished writes are not)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return {}
    found = {}
    for path in split_dir.iterdir():
        match = SHARD_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
    return dict(sorted(found.items()))


def split_shards(directory: str | Path) -> list[tuple[Path, ShardMeta]]:
    """The shards of a split in order, with their metas: one when ``directory`` is itself a shard.

    Refuses a split with shards missing (``k of n shards present``) or whose
    shards disagree on a :data:`SPLIT_FIELDS` field (shards of different runs).
    """
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        return [(directory, read_shard_meta(directory))]
    found = shard_dirs(directory)
    if not found:
        raise ShardError(
            f"{directory} is not a token shard: meta.json is missing and it holds no shard-NNNNN folders "
            "(tokenize the split first: make tokenize)"
        )
    shards = [(path, read_shard_meta(path)) for path in found.values()]
    first = shards[0][1]
    for path, meta in shards[1:]:
        diffs = [key for key in SPLIT_FIELDS if getattr(meta, key) != getattr(first, key)]
        if diffs:
            raise ShardError(
                f"{path} and {shards[0][0]} differ in {', '.join(diffs)}: the split mixes shards of different tokenize runs; "
                "rerun tokenize (python -m magnets.tokenize) to rewrite the stale ones"
            )
    n = first.num_shards
    missing = [shard_name(i) for i in range(n) if i not in found]
    if missing or len(found) != n:
        extra = sorted(set(found) - set(range(n)))
        what = f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else f"extra {extra[:5]}"
        raise ShardError(
            f"{directory}: {len(set(found) & set(range(n)))} of {n} shards present ({what}): the split is incomplete; "
            "rerun tokenize (python -m magnets.tokenize, or make train) to write the missing shards"
        )
    return shards


def split_meta(shards: list[ShardMeta]) -> ShardMeta:
    """The meta of a whole split: its first shard's, with the split's total count, item range and unreadable items."""
    if len(shards) == 1 and shards[0].shard is None:
        return shards[0]
    first = shards[0]
    return replace(
        first,
        count=sum(meta.count for meta in shards),
        shard=None,
        items=[0, first.split_items] if first.split_items is not None else None,
        unreadable=[entry for meta in shards for entry in meta.unreadable],
    )


def read_meta(directory: str | Path) -> ShardMeta:
    """The meta of a shard, or of a split of shards (:func:`split_meta`)."""
    return split_meta([meta for _, meta in split_shards(directory)])


def check_meta(meta: ShardMeta, directory: str | Path, expected: dict[str, object]) -> None:
    """Raise naming every field of ``meta`` that differs from ``expected``."""
    diffs = [
        f"{key}: shard has {getattr(meta, key)!r}, expected {value!r}"
        for key, value in expected.items()
        if getattr(meta, key) != value
    ]
    if diffs:
        raise ShardError(f"token shard {directory} does not match: " + "; ".join(diffs))


def _open_one(directory: Path, meta: ShardMeta) -> tuple[np.memmap, np.memmap]:
    """Tokens and labels memmaps of one shard, checked against its meta: both files present and whole, the shapes
    meta.json gives, token ids inside the codebook, labels non-negative. A fault names the file and the remedy."""
    remedy = f"delete {directory} and run the tokenize stage again to rewrite it"
    arrays = []
    for name in ("tokens.npy", "labels.npy"):
        path = directory / name
        if not path.is_file():
            raise ShardError(f"{path} is missing (meta.json is there): {remedy}")
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as err:  # a cut file: "mmap length is greater than file size", ...
            raise ShardError(f"{path} is unreadable, truncated or not a .npy array ({err}): {remedy}") from None
    tokens, labels = arrays
    if tokens.dtype != np.uint16 or tokens.shape != (meta.count, meta.tokens_per_item):
        raise ShardError(
            f"{directory}/tokens.npy is {tokens.dtype} {list(tokens.shape)}, "
            f"meta.json says uint16 [{meta.count}, {meta.tokens_per_item}]"
        )
    if labels.shape != (meta.count,):
        raise ShardError(f"{directory}/labels.npy has shape {list(labels.shape)}, meta.json says [{meta.count}]")
    if meta.count and int(tokens.max()) >= meta.codebook_size:  # one pass over the file; an id past it would index
        # past the transformer's embedding deep inside a training step
        raise ShardError(
            f"{directory}/tokens.npy holds token id {int(tokens.max())}, outside the codebook of {meta.codebook_size} "
            f"codes meta.json gives: {remedy}"
        )
    if meta.count and int(labels.min()) < 0:
        raise ShardError(f"{directory}/labels.npy holds label {int(labels.min())} < 0: {remedy}")
    return tokens, labels


def open_shard(
    directory: str | Path, **expected: object
) -> tuple[np.ndarray | ConcatenatedRows, np.ndarray | ConcatenatedRows, ShardMeta]:
    """Tokens ``[count, tokens]`` (read-only), labels ``[count]`` and meta of a shard or of a split of shards.

    One shard gives its memmaps; several give :class:`ConcatenatedRows` over
    theirs (rows in shard order). ``expected`` names meta fields that every
    shard must match, e.g. ``open_shard(d, codebook_size=512, grid=[8, 8])``.
    """
    shards = split_shards(directory)
    parts = []
    for path, meta in shards:
        check_meta(meta, path, expected)
        parts.append(_open_one(path, meta))
    meta = split_meta([meta for _, meta in shards])
    if len(parts) == 1:
        return parts[0][0], parts[0][1], meta
    return ConcatenatedRows([t for t, _ in parts]), ConcatenatedRows([lab for _, lab in parts]), meta


class ConcatenatedRows:
    """Several arrays (shards' memmaps) read as one along their first axis, without copying them.

    Indexing takes what the readers of a shard use: an int, a slice, an int
    or boolean array, each optionally followed by indices of the other axes
    (``rows[idx]``, ``rows[:8, :given]``); ``np.asarray(rows)`` concatenates.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts or any(p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype for p in parts):
            raise ValueError("ConcatenatedRows needs one or more arrays of one dtype and row shape")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])  # [P + 1]: part p holds rows offsets[p] .. offsets[p+1]-1
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        rows = np.concatenate(self.parts)
        return rows if dtype is None else rows.astype(dtype)

    def __getitem__(self, key: Any) -> Any:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, int | np.integer):
            index = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {rows} is out of range for {len(self)} rows")
            part = int(np.searchsorted(self.offsets, index, side="right")) - 1
            item = (index - int(self.offsets[part]), *rest)
            return self.parts[part][item]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            out = self._slice(start, stop) if step == 1 else self._take(np.arange(start, stop, step))
        else:
            selector = np.asarray(rows)
            out = self._take(np.flatnonzero(selector) if selector.dtype == bool else selector.astype(np.int64))
        columns = (slice(None), *rest)
        return out[columns] if rest else out

    def _slice(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        for part, (first, end) in enumerate(zip(self.offsets[:-1], self.offsets[1:], strict=True)):
            low, high = max(start, int(first)), min(stop, int(end))
            if low < high:
                pieces.append(self.parts[part][low - first : high - first])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), self.dtype)

    def _take(self, index: np.ndarray) -> np.ndarray:
        index = np.where(index < 0, index + len(self), index)  # [K]
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        part_of = np.searchsorted(self.offsets, index, side="right") - 1  # [K]: the part holding each row
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for part in np.unique(part_of):
            mask = part_of == part
            out[mask] = self.parts[part][index[mask] - self.offsets[part]]
        return out


class TokenDataset(Dataset):
    """Items of a shard, or of a split of shards, as ``(tokens int64 [N], label int64)``.

    ``tokens`` and ``labels`` index like arrays (memmaps, or
    :class:`ConcatenatedRows` over several shards); ``meta`` is the split's
    (:func:`split_meta`).
    """

    def __init__(self, directory: str | Path, num_classes: int | None = None, **expected: object) -> None:
        """``expected``: meta fields every shard must match (:func:`open_shard`); ``num_classes``: when given, every
        label must be below it (the class embedding's size, ``data.num_classes``)."""
        self.tokens, self.labels, self.meta = open_shard(directory, **expected)
        if num_classes is not None and self.meta.count and int(np.max(self.labels)) >= num_classes:
            raise ShardError(
                f"{directory}: labels reach {int(np.max(self.labels))}, but data.num_classes={num_classes} allows "
                f"0..{num_classes - 1}: set data.num_classes to the dataset's class count (at least "
                f"{int(np.max(self.labels)) + 1})"
            )

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
    """Token splits ``<root>/<split>`` (directories of shards, or one shard each), checked against the model.

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
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.expected = {"codebook_size": codebook_size, "grid": list(grid)}
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def dataset(self, split: str) -> TokenDataset:
        return TokenDataset(self.root / split, num_classes=self.num_classes, **self.expected)

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
            # Batches already consumed: with gradient accumulation, several per optimizer step.
            start_step=(lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        return DataLoader(batches, batch_size=None)  # already batched; one process reads (memmap)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
