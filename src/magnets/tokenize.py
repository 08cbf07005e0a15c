"""Encode image splits with a trained tokenizer into token shards.

    python -m magnets.tokenize [experiment=NAME] [tokenize.splits=[train,val]] [tokenize.checkpoint=PATH]

A split whose shard already holds this tokenizer's tokens (same checkpoint
sha256, same augmentation, same count) is skipped.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from magnets.data.images import FashionMNISTDataModule, build_image_datamodule
from magnets.data.shards import ShardError, ShardMeta, read_meta, utc_now, write_shard
from magnets.lit.tokenizer import load_tokenizer
from magnets.models.vq import VQTokenizer

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def encode_split(
    tokens_out: np.ndarray,
    labels_out: np.ndarray,
    *,
    tokenizer: VQTokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    flip: bool,
    desc: str,
) -> None:
    """Encode ``images`` ``[N, C, H, W]`` uint8 into ``tokens_out`` ``[N * (2 if flip else 1), h*w]``.

    With ``flip`` the horizontally flipped images follow the originals as
    extra rows ``N .. 2N-1`` (with the same labels).
    """
    device = next(tokenizer.parameters()).device
    n = len(images)
    labels_out[:] = np.concatenate([labels, labels]) if flip else labels
    with tqdm(total=len(tokens_out), desc=desc, unit="img", mininterval=2.0) as bar:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).float().div_(255)
            views = [(0, batch)] + ([(n, batch.flip(-1))] if flip else [])
            for offset, view in views:
                ids = tokenizer.encode(view)  # [B, h, w]
                tokens_out[offset + start : offset + start + len(batch)] = ids.flatten(1).cpu().numpy().astype(np.uint16)
                bar.update(len(batch))


def shard_is_current(directory: Path, tokenizer_sha256: str, flip: bool, count: int) -> bool:
    try:
        meta = read_meta(directory)
    except ShardError:
        return False
    return meta.tokenizer_sha256 == tokenizer_sha256 and meta.flip_augmented == flip and meta.count == count


def tokenize_splits(
    checkpoint: str | Path,
    datamodule: FashionMNISTDataModule,
    dataset_name: str,
    out_dir: str | Path,
    splits: list[str],
    flip_splits: list[str],
    batch_size: int = 512,
    device: str = "cpu",
) -> dict[str, Path]:
    """Write one shard per split under ``out_dir``; returns split -> shard directory."""
    checkpoint = Path(checkpoint)
    tokenizer = load_tokenizer(checkpoint).to(device)
    sha = file_sha256(checkpoint)
    grid = [tokenizer.cfg.grid_size, tokenizer.cfg.grid_size]
    shards = {}
    for split in splits:
        images, labels = datamodule.split_arrays(split)
        flip = split in flip_splits
        count = len(images) * (2 if flip else 1)
        target = Path(out_dir) / split
        shards[split] = target
        if shard_is_current(target, sha, flip, count):
            log.info("token shard %s is up to date; skipping", target)
            continue
        meta = ShardMeta(
            dataset=dataset_name,
            split=split,
            count=count,
            grid=grid,
            codebook_size=tokenizer.cfg.codebook_size,
            tokenizer_checkpoint=str(checkpoint),
            tokenizer_sha256=sha,
            flip_augmented=flip,
            created=utc_now(),
        )
        fill = partial(
            encode_split,
            tokenizer=tokenizer,
            images=images,
            labels=labels,
            batch_size=batch_size,
            flip=flip,
            desc=f"tokenize {split}",
        )
        write_shard(target, meta, fill)
        log.info("wrote %d items of %s tokens to %s", count, "x".join(map(str, grid)), target)
    return shards


def tokenize(cfg: DictConfig) -> dict[str, Path]:
    """Tokenize the configured splits with the configured (or final) tokenizer checkpoint."""
    checkpoint = cfg.tokenize.checkpoint or Path(cfg.tokenizer.dir) / "tokenizer.ckpt"
    return tokenize_splits(
        checkpoint=checkpoint,
        datamodule=build_image_datamodule(cfg.data),
        dataset_name=cfg.data.name,
        out_dir=cfg.tokenize.out_dir,
        splits=list(cfg.tokenize.splits),
        flip_splits=list(cfg.tokenize.flip_splits),
        batch_size=cfg.tokenize.batch_size,
        device=cfg.tokenize.device,
    )


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tokenize(cfg)


if __name__ == "__main__":
    main()
