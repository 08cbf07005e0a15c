"""The seams between images and video: tokenization over a datamodule, shard metadata, the media writer, entry errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from conftest import REPO
from magnets.data.shards import ShardError, ShardMeta, open_shard, utc_now, write_shard
from magnets.data.tokenization import encode_split
from magnets.media import frame_strip, log_media, save_media


class PixelTokenizer(nn.Module):
    """A tokenizer whose code ids are the pixels of a one-channel item: the grid is the media's own shape."""

    def __init__(self, grid: tuple[int, ...]) -> None:
        super().__init__()
        self.grid, self.codebook_size = grid, 256
        self.unused = nn.Parameter(torch.zeros(1))  # encode_split reads the device from the parameters

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] * 255).round().long()  # [B, *grid]


class RandomMedia(Dataset):
    def __init__(self, shape: tuple[int, ...], n: int = 5) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index], self.labels[index]


@pytest.mark.parametrize("shape", [(1, 4, 6), (1, 3, 4, 6)], ids=["image", "clip"])
def test_flip_copies_are_mirrored_horizontally(shape):
    """Rows N..2N-1 hold each item mirrored left-right (width reversed), never upside down."""
    dataset = RandomMedia(shape)
    grid = shape[1:]
    n, per_item = len(dataset), int(np.prod(grid))
    tokens, labels = np.zeros((2 * n, per_item), np.uint16), np.zeros(2 * n, np.int64)
    encode_split(
        tokens, labels, tokenizer=PixelTokenizer(grid), dataset=dataset, batch_size=2, num_workers=0, flip=True, desc="t"
    )
    originals = tokens[:n].reshape(n, *grid)
    mirrored = tokens[n:].reshape(n, *grid)
    np.testing.assert_array_equal(originals, dataset.items[:, 0].numpy())
    np.testing.assert_array_equal(mirrored, originals[..., ::-1])
    assert not np.array_equal(mirrored, originals[..., ::-1, :])  # a vertical flip would differ
    np.testing.assert_array_equal(labels, np.concatenate([dataset.labels, dataset.labels]))


def video_meta(grid: list[int], count: int = 3) -> ShardMeta:
    media = {"kind": "video", "frames": 17, "stride": 1, "resolution": [32, 32], "fps": 8.0, "channels": 1}
    return ShardMeta(
        dataset="moving_fmnist", split="train", count=count, grid=grid, codebook_size=1000,
        tokenizer_checkpoint="/x/tok.ckpt", tokenizer_sha256="ab" * 32, flip_augmented=False, created=utc_now(), media=media,
    )  # fmt: skip


def test_video_shard_round_trip_and_meta_refusal(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, (3, 5 * 8 * 8)).astype(np.uint16)

    def fill(tokens_out, labels_out):
        tokens_out[:] = tokens
        labels_out[:] = [0, 1, 2]

    write_shard(tmp_path / "train", video_meta([5, 8, 8]), fill)
    read_tokens, read_labels, meta = open_shard(tmp_path / "train", codebook_size=1000, grid=[5, 8, 8])
    np.testing.assert_array_equal(read_tokens, tokens)
    assert meta.media["frames"] == 17 and meta.media["kind"] == "video" and meta.tokens_per_item == 320
    with pytest.raises(ShardError, match=r"grid: shard has \[5, 8, 8\], expected \[3, 8, 8\]"):
        open_shard(tmp_path / "train", codebook_size=1000, grid=[3, 8, 8])
    with pytest.raises(ShardError, match=r"codebook_size: shard has 1000, expected 512"):
        open_shard(tmp_path / "train", codebook_size=512, grid=[5, 8, 8])


def test_media_writer_images_and_clips(tmp_path):
    images = torch.rand(6, 1, 8, 10)
    (png,) = save_media(images, tmp_path / "images_w0.5", nrow=3)
    assert png.name == "images_w0.5.png"  # a dot in the stem is part of the name
    assert np.asarray(Image.open(png)).shape == (2 * 10 + 2, 3 * 12 + 2, 3)

    clips = torch.rand(2, 1, 5, 8, 10)
    clips[1] = 0  # the second clip is black: its strip row must be
    gif, strip = save_media(clips, tmp_path / "clips", nrow=2, fps=4)
    assert gif.suffix == ".gif" and strip.name == "clips_frames.png"
    animation = Image.open(gif)
    assert animation.n_frames == 5 and animation.size == (2 * 12 + 2, 8 + 4)  # (width, height)
    strip_pixels = np.asarray(Image.open(strip))
    assert strip_pixels.shape == (2 * 10 + 2, 5 * 12 + 2, 3)  # one row per clip, one column per frame
    assert strip_pixels[12 + 2 : 12 + 8, 2:10].max() == 0 and strip_pixels[2:8, 2:10].max() > 0
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind

    logged = []

    class Writer:
        def add_image(self, tag, picture, step):
            logged.append((tag, tuple(picture.shape), step))

    log_media(Writer(), "val/samples", clips, step=7)
    assert logged == [("val/samples", tuple(frame_strip(clips).shape), 7)]


def run_module(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bad_config_values_end_in_one_line_before_any_work(tmp_path):
    """A bad value is named with the valid ones, exit 2, no traceback, before a model is loaded."""
    result = run_module("magnets.sample", "decode.cache=bogus", f"paths.runs={tmp_path}", f"hydra.run.dir={tmp_path}/h", cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: decode.cache='bogus' is not valid; valid: none, refresh_on_switch"), lines
    assert "Traceback" not in result.stderr and len(lines) == 1

    result = run_module("magnets.train", "model.size=huge", f"paths.runs={tmp_path}", f"hydra.run.dir={tmp_path}/h", cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: model.size='huge' is not valid; valid: tiny, fmnist, fmnist_paper, s, b, l, xl"
    assert not (tmp_path / "tokenizers").exists()  # no stage started
