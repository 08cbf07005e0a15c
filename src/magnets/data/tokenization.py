"""Media splits to token shards with a trained tokenizer (the library behind ``python -m magnets.tokenize``).

One data path for images and clips. A split of N source items is written as
``ceil(N / items_per_shard)`` shards (at least one)::

    <out_dir>/<split>/shard-00000/{tokens.npy, labels.npy, meta.json}   source items [0, P)
    <out_dir>/<split>/shard-00001/...                                    source items [P, 2P)
    <out_dir>/<split>/report.json                                        once every shard is there

Shard ``i`` holds the readable items of its range in order, then (for a split
in ``flip_splits``) their horizontal mirrors in the same order. Its
``meta.json`` records the range, the split's shard count and size, the
tokenizer's sha256, and the items it left out because they could not be read
(``magnets.data.base.UNREADABLE_LABEL``: file and reason). Every shard is
written atomically (:func:`magnets.data.shards.write_shard`).

Resuming: a shard whose ``meta.json`` already describes what would be written
(same tokenizer sha256, range, split size, media, augmentation; see
:func:`shard_is_current`) is skipped, so a rerun after a crash writes only the
missing shards. Several processes share the work without talking to each
other: shard ``i`` belongs to rank ``i % world_size`` (:func:`process_rank`).
The process that finds a split complete removes what an older tokenization
left there and writes ``report.json``: items read and skipped, rows, shards,
and every unreadable file with its reason.

Readers (:class:`magnets.data.shards.TokenDataset`) see a split as one
dataset and refuse an incomplete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from magnets.data.base import UNREADABLE_LABEL, MediaDataModule, to_unit_float
from magnets.data.shards import ShardError, ShardMeta, read_shard_meta, shard_dirs, shard_name, utc_now, write_shard
from magnets.errors import ConfigError
from magnets.files import atomic_write_json, file_sha256
from magnets.lit.tokenizer import load_tokenizer
from magnets.models.tokenizer import Tokenizer, num_tokens
from magnets.runs import shard_dir

log = logging.getLogger(__name__)

# Source items per shard, for every dataset. ImageNet's train split (1.28M images) becomes 129 shards of ~10 MB
# (20,000 rows of 256 uint16 tokens with flips), enough for 129 processes to share; a crash loses at most one shard's
# work per process; a shard's tokens (P x 2 x prod(grid) x 2 bytes: 10 MB, ~50 MB for 1,280-token clips) are held in
# memory until it is written. Small datasets (Fashion-MNIST, UCF101) are one shard per split.
DEFAULT_ITEMS_PER_SHARD = 10_000
REPORT_NAME = "report.json"
# Meta fields that say nothing about the tokens: when and from which path the shard was written.
VOLATILE_META = ("created", "tokenizer_checkpoint")
# Meta fields that are the outcome of encoding, not part of what was asked for.
RESULT_META = ("count", "unreadable")


class TokenizeFailedElsewhere(RuntimeError):
    """Another process sharing the shards failed: this one stops waiting for them."""


# ---------------------------------------------------------------------------------------------------------------------
# Who does what: ranks, devices, workers


def process_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's ``(rank, world_size)`` for sharing shards: shard ``i`` is rank ``i % world_size``'s.

    Given values win (both or neither). Otherwise: ``torch.distributed``'s
    when a process group exists (the Lightning DDP stages of ``make
    train``), else the launcher's environment (torchrun's ``RANK`` and
    ``WORLD_SIZE``; ``srun``'s ``SLURM_PROCID`` and ``SLURM_NTASKS``), else
    ``(0, 1)``.
    """
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("tokenize.rank", rank, "null together with tokenize.world_size, or ints for both")
        source = "tokenize.rank/world_size"
    elif dist.is_available() and dist.is_initialized():
        rank, world_size, source = dist.get_rank(), dist.get_world_size(), "torch.distributed"
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size, source = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "RANK/WORLD_SIZE"
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world_size, source = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), "SLURM_PROCID/SLURM_NTASKS"
    else:
        return 0, 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("tokenize.world_size", world_size, f"a positive integer (from {source})")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError("tokenize.rank", rank, f"an integer in [0, {world_size}) (from {source})")
    return rank, world_size


def local_device(device: str) -> str:
    """``cuda`` -> this process's GPU on a node of several (``LOCAL_RANK``, ``SLURM_LOCALID``, or the current device)."""
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    index = int(local) if local is not None else torch.cuda.current_device()
    return f"cuda:{index % torch.cuda.device_count()}"


def default_workers(datamodule_workers: int) -> int:
    """Decoding workers when ``tokenize.num_workers`` is null: the datamodule's own count, at most this process's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux: this job's
    return max(0, min(int(datamodule_workers), cpus))


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


class IndexedItems(Dataset):
    """``dataset``'s items as ``(index, media, label)``, so that the reader knows which item an unreadable one was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, Any]:
        media, label = self.dataset[index]
        return index, media, label


class RangeBatches(Sampler[list[int]]):
    """Batches of consecutive indices over ``ranges`` (``[start, end)`` each, in order), none crossing a range's end."""

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int) -> None:
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, end in self.ranges:
            for first in range(start, end, self.batch_size):
                yield list(range(first, min(first + self.batch_size, end)))

    def __len__(self) -> int:
        return sum(math.ceil((end - start) / self.batch_size) for start, end in self.ranges)


@dataclass
class EncodedItems:
    """Tokens ``[rows, prod(grid)]`` uint16 and labels ``[rows]`` of some items (then their mirrors), and the unreadable ones."""

    tokens: np.ndarray
    labels: np.ndarray
    unreadable: list[dict[str, Any]]

    def fill(self, tokens_out: np.ndarray, labels_out: np.ndarray) -> None:
        """Copy into a shard's memmaps (:func:`write_shard`'s ``fill``)."""
        tokens_out[:] = self.tokens
        labels_out[:] = self.labels


def describe_unreadable(dataset: Dataset, index: int) -> dict[str, Any]:
    """``{"index", "path", "reason"}`` of an item the dataset marked unreadable."""
    why = getattr(dataset, "why_unreadable", None)
    found = why(index) if why is not None else {"path": None, "reason": "marked unreadable by the dataset"}
    return {"index": index, **found}


@torch.no_grad()
def encode_batches(
    tokenizer: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    flip: bool,
    describe: Callable[[int], dict[str, Any]],
    progress: Callable[[int], Any] = lambda n: None,
) -> EncodedItems:
    """Encode batches ``(indices [B], uint8 media [B, C, (T,) H, W], labels [B])``, leaving out unreadable items.

    Rows: the readable items in order, then with ``flip`` the same items
    mirrored left-right (last axis, width, reversed) in the same order, with
    the same labels. ``describe(index)`` names each unreadable item.
    """
    device = next(tokenizer.parameters()).device
    originals: list[np.ndarray]
    mirrored: list[np.ndarray]
    originals, mirrored, labels, unreadable = [], [], [], []
    for indices, media, batch_labels in batches:
        batch_labels = torch.as_tensor(batch_labels, dtype=torch.int64)
        readable = batch_labels != UNREADABLE_LABEL  # [B]
        unreadable += [describe(int(index)) for index in indices[~readable]]
        if readable.any():
            x = to_unit_float(media[readable].to(device, non_blocking=True))  # [b, C, H, W] or [b, C, T, H, W]
            views = [(originals, x)] + ([(mirrored, x.flip(-1))] if flip else [])
            for rows, view in views:
                rows.append(
                    cast(Tokenizer, tokenizer).encode(view).flatten(1).cpu().numpy().astype(np.uint16)  # [b, *grid] -> [b, N]
                )
            labels.append(batch_labels[readable].numpy())
        progress(len(indices))
    width = num_tokens(cast(Tokenizer, tokenizer).grid)
    tokens = np.concatenate(originals + mirrored) if originals else np.empty((0, width), np.uint16)  # [rows, N]
    label_rows = np.concatenate(labels * (2 if flip else 1)) if labels else np.empty(0, np.int64)  # [rows]
    return EncodedItems(tokens, label_rows, unreadable)


def encode_split(
    tokens_out: np.ndarray,
    labels_out: np.ndarray,
    *,
    tokenizer: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    flip: bool,
    desc: str,
) -> None:
    """Encode a whole (small) dataset into one shard's ``tokens_out`` ``[N * (2 if flip else 1), prod(grid)]``.

    A ``fill`` for :func:`write_shard` when a shard is made by hand:
    ``write_shard(d, meta, partial(encode_split, tokenizer=..., ...))``. With
    ``flip`` the mirrored items are rows ``N .. 2N-1``; an unreadable item is
    an error here (the row count is fixed in advance).
    """
    loader = DataLoader(IndexedItems(dataset), batch_size=batch_size, num_workers=num_workers)
    with tqdm(total=len(cast(Sized, dataset)), desc=desc, unit="item", mininterval=2.0) as bar:
        encoded = encode_batches(tokenizer, loader, flip, partial(describe_unreadable, dataset), bar.update)
    if len(encoded.tokens) != len(tokens_out):
        raise ShardError(
            f"{desc}: encoded {len(encoded.tokens)} rows for {len(tokens_out)} ({len(encoded.unreadable)} items unreadable, "
            f"e.g. {encoded.unreadable[:1]})"
        )
    encoded.fill(tokens_out, labels_out)


# ---------------------------------------------------------------------------------------------------------------------
# Planning, skipping, finishing a split


def stale_reason(directory: Path, wanted: ShardMeta) -> str | None:
    """Why the shard at ``directory`` does not hold what ``wanted`` describes, in a few words; None when it does.

    Every field but :data:`VOLATILE_META` and :data:`RESULT_META` must agree.
    """
    if not (directory / "meta.json").is_file():
        return "not written"
    try:
        meta = read_shard_meta(directory)
    except ShardError as err:
        return f"unreadable meta.json ({err})"
    found, expected = asdict(meta), asdict(wanted)
    stale = [key for key in expected if key not in VOLATILE_META + RESULT_META and found[key] != expected[key]]
    if not stale:
        return None
    return "; ".join(f"{key} was {found[key]!r}, now {expected[key]!r}" for key in stale)


def shard_is_current(directory: Path, wanted: ShardMeta) -> bool:
    """True when the shard at ``directory`` holds what ``wanted`` describes (:func:`stale_reason` finds nothing)."""
    return stale_reason(directory, wanted) is None


@dataclass
class SplitPlan:
    """The shards of one split: where they go, the dataset they read, and what each must hold."""

    split: str
    directory: Path
    dataset: Dataset
    wanted: list[ShardMeta]  # per shard; count, unreadable and created are filled in when it is written
    items_per_shard: int

    @property
    def num_shards(self) -> int:
        return len(self.wanted)

    def path(self, index: int) -> Path:
        return self.directory / shard_name(index)

    def item_range(self, index: int) -> tuple[int, int]:
        items = self.wanted[index].items
        assert items is not None  # plan_split records every shard's items
        start, end = items
        return start, end

    def missing(self) -> list[int]:
        """Indices of the shards not (yet) written as wanted."""
        return [i for i, meta in enumerate(self.wanted) if not shard_is_current(self.path(i), meta)]


def plan_split(
    datamodule: MediaDataModule,
    split: str,
    *,
    out_dir: str | Path,
    items_per_shard: int,
    flip: bool,
    template: ShardMeta,
) -> SplitPlan:
    """The shards of ``split``: ``max(1, ceil(N / items_per_shard))`` ranges of source items, each one shard."""
    dataset = datamodule.dataset(split, augment=False)  # the same item every time: reproducible shards
    n = len(cast(Sized, dataset))
    num_shards = max(1, math.ceil(n / items_per_shard))
    wanted = [
        replace(
            template,
            split=split,
            flip_augmented=flip,
            shard=i,
            num_shards=num_shards,
            items=[i * items_per_shard, min((i + 1) * items_per_shard, n)],
            split_items=n,
        )
        for i in range(num_shards)
    ]
    return SplitPlan(split, shard_dir(out_dir, split), dataset, wanted, items_per_shard)


def finish_split(plan: SplitPlan) -> bool:
    """When every shard is written: remove what older runs left in the split's folder, write ``report.json``; else False.

    Left-overs are shards numbered beyond this split's count, a split written
    as one shard (``meta.json`` in the split's folder) and the temporaries of
    killed writes. The report is rewritten only when its content changes.
    """
    if plan.missing():
        return False
    metas = [read_shard_meta(plan.path(i)) for i in range(plan.num_shards)]
    for index, path in shard_dirs(plan.directory).items():
        if index >= plan.num_shards:
            shutil.rmtree(path, ignore_errors=True)
    for name in ("meta.json", "tokens.npy", "labels.npy"):  # meta.json first: readers then no longer see a shard there
        (plan.directory / name).unlink(missing_ok=True)
    for leftover in plan.directory.glob(".shard-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    unreadable = [{**entry, "shard": meta.shard} for meta in metas for entry in meta.unreadable]
    first = metas[0]
    assert first.split_items is not None  # plan_split records it
    report = {
        "dataset": first.dataset,
        "split": plan.split,
        "tokenizer_sha256": first.tokenizer_sha256,
        "flip_augmented": first.flip_augmented,
        "items": first.split_items,
        "read": first.split_items - len(unreadable),
        "skipped": len(unreadable),
        "rows": sum(meta.count for meta in metas),
        "shards": plan.num_shards,
        "items_per_shard": plan.items_per_shard,
        "unreadable": unreadable,
    }
    path = plan.directory / REPORT_NAME
    try:
        unchanged = json.loads(path.read_text()) == report
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:
        atomic_write_json(path, report)
        if unreadable:
            log.warning("%s: %d unreadable items were skipped; listed in %s", plan.split, len(unreadable), path)
    return True


@dataclass(frozen=True)
class ShardWait:
    """How a process waits for the shards of the others: polling, until done, a timeout, or another's failure."""

    failed_marker: Path  # a process that fails leaves this file; the waiting ones then stop too
    poll_s: float = 5.0
    timeout_s: float = 24 * 3600


def wait_for_splits(plans: list[SplitPlan], wait: ShardWait, rank: int, world_size: int) -> None:
    """Return once every split is complete (and finished: :func:`finish_split`); raise on another's failure or timeout."""
    deadline = time.monotonic() + wait.timeout_s
    for plan in plans:
        while not finish_split(plan):
            if wait.failed_marker.is_file():
                raise TokenizeFailedElsewhere(
                    f"rank {rank}: another process failed to tokenize ({wait.failed_marker.read_text().strip()})"
                )
            if time.monotonic() > deadline:
                missing = plan.missing()
                raise TimeoutError(
                    f"rank {rank}: {plan.directory} still misses {len(missing)} of {plan.num_shards} shards after "
                    f"{wait.timeout_s:.0f} s, e.g. {shard_name(missing[0])} (rank {missing[0] % world_size}'s)"
                )
            time.sleep(wait.poll_s)


# ---------------------------------------------------------------------------------------------------------------------
# The whole job


def encode_shards(
    plan: SplitPlan,
    pending: list[int],
    tokenizer: nn.Module,
    *,
    batch_size: int,
    num_workers: int,
    unit: str,
) -> None:
    """Encode and write shards ``pending`` of ``plan``, in order, through one DataLoader over their items."""
    ranges = [plan.item_range(i) for i in pending]
    pin = next(tokenizer.parameters()).device.type == "cuda"
    loader = DataLoader(
        IndexedItems(plan.dataset), batch_sampler=RangeBatches(ranges, batch_size), num_workers=num_workers, pin_memory=pin
    )
    batches = iter(loader)
    describe = partial(describe_unreadable, plan.dataset)
    with tqdm(total=sum(end - start for start, end in ranges), desc=f"tokenize {plan.split}", unit=unit, mininterval=2.0) as bar:
        for index, (start, end) in zip(pending, ranges, strict=True):
            shard_batches = islice(batches, math.ceil((end - start) / batch_size))  # RangeBatches: exactly this shard's
            encoded = encode_batches(tokenizer, shard_batches, plan.wanted[index].flip_augmented, describe, bar.update)
            meta = replace(plan.wanted[index], count=len(encoded.tokens), unreadable=encoded.unreadable, created=utc_now())
            write_shard(plan.path(index), meta, encoded.fill)
            log.info(
                "wrote %s: items %d-%d, %d rows, %d unreadable", plan.path(index), start, end, meta.count, len(encoded.unreadable)
            )


def tokenize_splits(
    checkpoint: str | Path,
    datamodule: MediaDataModule,
    dataset_name: str,
    out_dir: str | Path,
    splits: list[str],
    flip_splits: list[str],
    batch_size: int = 512,
    device: str = "cpu",
    num_workers: int = 0,
    items_per_shard: int = DEFAULT_ITEMS_PER_SHARD,
    rank: int = 0,
    world_size: int = 1,
    wait: ShardWait | None = None,
) -> dict[str, Path]:
    """Write this process's missing shards of every split under ``out_dir``; returns split -> the split's folder.

    This process writes shards ``i`` with ``i % world_size == rank``; current
    shards are skipped. A split found complete is finished
    (:func:`finish_split`). With ``wait`` this returns only once every split
    is complete, the other processes' shards included.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard={items_per_shard} must be a positive integer")
    checkpoint = Path(checkpoint)
    tokenizer = load_tokenizer(checkpoint).to(device)
    media = datamodule.media_info()
    template = ShardMeta(
        dataset=dataset_name,
        split="",
        count=0,
        grid=list(cast(Tokenizer, tokenizer).grid),
        codebook_size=cast(Tokenizer, tokenizer).codebook_size,
        tokenizer_checkpoint=str(checkpoint),
        tokenizer_sha256=file_sha256(checkpoint),
        flip_augmented=False,
        created="",
        media=media,
    )
    unit = "img" if media.get("kind") == "image" else "clip"
    # Every split's items are listed before any is encoded: a split that cannot be read fails now, not hours in.
    plans = [
        plan_split(
            datamodule, split, out_dir=out_dir, items_per_shard=items_per_shard, flip=split in flip_splits, template=template
        )
        for split in splits
    ]
    for plan in plans:
        own = list(range(rank, plan.num_shards, world_size))
        reasons = {i: stale_reason(plan.path(i), plan.wanted[i]) for i in own}
        pending = [i for i in own if reasons[i] is not None]
        for i in pending:
            if reasons[i] != "not written":  # a stale shard: say which field made it so
                log.info("%s: rewriting %s: %s", plan.split, plan.path(i), reasons[i])
        if len(pending) < len(own):
            log.info(
                "%s: %d of the %d shards of rank %d/%d are already written; skipping them",
                plan.split, len(own) - len(pending), len(own), rank, world_size,
            )  # fmt: skip
        if pending:
            encode_shards(plan, pending, tokenizer, batch_size=batch_size, num_workers=num_workers, unit=unit)
        if not finish_split(plan):
            written = plan.num_shards - len(plan.missing())
            log.info("%s: %d of %d shards written; the others are other processes'", plan.split, written, plan.num_shards)
    if wait is not None:
        wait_for_splits(plans, wait, rank, world_size)
    return {plan.split: plan.directory for plan in plans}
