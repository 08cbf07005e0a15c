"""Media splits to token shards with a trained tokenizer (the library behind ``python -m magnets.tokenize``).

Each split of a media datamodule is read through a DataLoader, encoded batch
by batch and written as one token shard (``magnets.data.shards``). A split
whose shard already holds this tokenizer's tokens (same checkpoint sha256,
same augmentation, same count) is skipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from magnets.data.base import MediaDataModule, to_unit_float
from magnets.data.shards import ShardError, ShardMeta, read_meta, utc_now, write_shard
from magnets.files import file_sha256
from magnets.lit.tokenizer import load_tokenizer
from magnets.runs import shard_dir

log = logging.getLogger(__name__)


@torch.no_grad()
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
    """Encode every item of ``dataset`` into rows of ``tokens_out`` ``[N * (2 if flip else 1), prod(grid)]``.

    With ``flip`` the horizontally mirrored items (last axis, width, reversed)
    follow the originals as extra rows ``N .. 2N-1``, with the same labels.
    """
    device = next(tokenizer.parameters()).device
    n = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    start = 0
    with tqdm(total=len(tokens_out), desc=desc, unit="item", mininterval=2.0) as bar:
        for media, labels in loader:
            media = to_unit_float(media.to(device))  # [B, C, H, W] or [B, C, T, H, W]
            end = start + len(media)
            views = [(0, media)] + ([(n, media.flip(-1))] if flip else [])
            for offset, view in views:
                ids = tokenizer.encode(view)  # [B, *grid]
                tokens_out[offset + start : offset + end] = ids.flatten(1).cpu().numpy().astype(np.uint16)
                labels_out[offset + start : offset + end] = labels.numpy()
                bar.update(len(media))
            start = end
    if start != n:
        raise ShardError(f"{desc}: the dataset yielded {start} items but reported {n}")


# Meta fields that say nothing about the tokens: when and from which path the shard was written.
VOLATILE_META = ("created", "tokenizer_checkpoint")


def shard_is_current(directory: Path, wanted: ShardMeta) -> bool:
    """True when the shard at ``directory`` holds what ``wanted`` describes (all but :data:`VOLATILE_META` agree)."""
    try:
        meta = read_meta(directory)
    except ShardError:
        return False
    found, expected = asdict(meta), asdict(wanted)
    return all(found[key] == expected[key] for key in expected if key not in VOLATILE_META)


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
) -> dict[str, Path]:
    """Write one shard per split under ``out_dir``; returns split -> shard directory."""
    checkpoint = Path(checkpoint)
    tokenizer = load_tokenizer(checkpoint).to(device)
    sha = file_sha256(checkpoint)
    grid = list(tokenizer.grid)
    shards = {}
    for split in splits:
        dataset = datamodule.dataset(split, augment=False)  # the same item every time: reproducible shards
        flip = split in flip_splits
        count = len(dataset) * (2 if flip else 1)
        target = shard_dir(out_dir, split)
        shards[split] = target
        meta = ShardMeta(
            dataset=dataset_name,
            split=split,
            count=count,
            grid=grid,
            codebook_size=tokenizer.codebook_size,
            tokenizer_checkpoint=str(checkpoint),
            tokenizer_sha256=sha,
            flip_augmented=flip,
            created=utc_now(),
            media=datamodule.media_info(),
        )
        if shard_is_current(target, meta):
            log.info("token shard %s is up to date; skipping", target)
            continue
        fill = partial(
            encode_split,
            tokenizer=tokenizer,
            dataset=dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            flip=flip,
            desc=f"tokenize {split}",
        )
        write_shard(target, meta, fill)
        log.info("wrote %d items of %s tokens to %s", count, "x".join(map(str, grid)), target)
    return shards
