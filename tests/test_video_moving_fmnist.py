"""The embedded moving Fashion-MNIST videos: motion, determinism, both layouts on disk, the datamodule from the config."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config, synthetic_split
from magnets.data import moving_fmnist
from magnets.data.base import build_datamodule
from magnets.data.moving_fmnist import (
    CLASS_NAMES,
    MovingFMNISTDataModule,
    MovingFMNISTSpec,
    bouncing_path,
    generate,
    moving_clip,
    videos,
)
from magnets.data.video import Kinetics600DataModule, UCF101DataModule
from magnets.errors import ConfigError

TINY = MovingFMNISTSpec(canvas=32, item_size=8, num_items=2, video_frames=6, clips_per_group=1, seed=3)


def synthetic_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like ``train`` / ``test`` images ``[N, 28, 28]`` and labels ``[N]``, every class 20 / 6 times."""
    images, _ = synthetic_split(200 if split == "train" else 60, seed=0 if split == "train" else 1)
    return images, np.arange(len(images)) % 10


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """TINY written once in each layout (250 videos each)."""
    root = tmp_path_factory.mktemp("moving_fmnist")
    return {layout: generate(root / layout, layout, TINY, synthetic_images) for layout in ("ucf101", "kinetics600")}


def test_items_bounce_inside_the_canvas():
    limit, speed = 16.0, 20.0
    path = bouncing_path(np.random.default_rng(0), 400, limit, speed)  # [T, 2]
    assert path.min() >= 0 and path.max() <= limit
    assert path.min() < 1 and path.max() > limit - 1  # it reaches the walls ...
    fast = bouncing_path(np.random.default_rng(0), 50, 4.0, 100.0)  # steps of 10 pixels in a free range of 4
    assert fast.min() >= 0 and fast.max() <= 4.0
    steps = np.abs(np.diff(path, axis=0))
    assert steps.max() <= 0.1 * speed + 1e-9 and (np.diff(np.sign(np.diff(path, axis=0)), axis=0) != 0).any()  # ... and turns
    item = np.full((1, 16, 16), 200, dtype=np.uint8)
    video = moving_clip(item, np.random.default_rng(1), 60, 32, speed)  # [T, 32, 32]
    assert (video.reshape(60, -1).sum(1) == item.sum()).all()  # the whole item is on the canvas in every frame
    assert (video[1:] != video[:-1]).any(axis=(1, 2)).mean() > 0.9  # and it moves
    # Two items on a canvas no larger than one: they overlap everywhere, and the composite is their max.
    pair = np.stack([np.full((8, 8), 90, np.uint8), np.tile(np.array([0, 250], np.uint8), (8, 4))])
    overlap = moving_clip(pair, np.random.default_rng(2), 3, 8, speed)  # [T, 8, 8]
    assert (overlap == np.maximum(pair[0], pair[1])).all()


def test_generator_is_deterministic():
    first = [frames for _, frames in itertools.islice(videos(TINY, synthetic_images), 30)]
    again = [frames for _, frames in itertools.islice(videos(TINY, synthetic_images), 30)]
    other = [
        frames for _, frames in itertools.islice(videos(MovingFMNISTSpec(**{**TINY.__dict__, "seed": 4}), synthetic_images), 30)
    ]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert first[0].shape == (6, 32, 32) and first[0].dtype == np.uint8


def test_ucf101_layout_on_disk_and_read_back_exactly(generated):
    root = generated["ucf101"]
    lists = root / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_bytes().startswith(b"1 TShirtTop\r\n2 Trouser\r\n")
    assert sorted(p.name for p in (root / "AnkleBoot").iterdir())[0] == "v_Ankleboot_g01_c01.avi"  # the case quirk on disk
    assert b"AnkleBoot/v_AnkleBoot_g01_c01.avi\r\n" in (lists / "testlist01.txt").read_bytes()  # the list says otherwise
    assert b"AnkleBoot/v_AnkleBoot_g08_c01.avi 10\r\n" in (lists / "trainlist01.txt").read_bytes()
    assert b"_g08_" in (lists / "testlist02.txt").read_bytes() and b"_g08_" not in (lists / "trainlist02.txt").read_bytes()
    assert not list(root.parent.glob(".*partial*"))
    datamodule = UCF101DataModule(root, frames=5, size=32, channels=1, val_size=20)
    assert [len(datamodule.dataset(s)) for s in ("train", "val", "test")] == [160, 20, 70]
    # Every test clip is the generator's frames 0..4 (the centre clip of 6), bit for bit.
    expected = {(v.label, v.group, v.clip): frames for v, frames in videos(TINY, synthetic_images)}
    test = datamodule.dataset("test")
    for i in range(0, 70, 9):
        name = test.paths[i].name  # v_<Class>_gXX_cYY.avi
        key = (test.labels[i], int(name[-10:-8]), int(name[-6:-4]))
        assert test.paths[i].parent.name == CLASS_NAMES[key[0]]
        np.testing.assert_array_equal(test[i][0][0].numpy(), expected[key][:5])


def test_kinetics_layout_on_disk(generated):
    root = generated["kinetics600"]
    with open(root / "annotations" / "validate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0].keys() == {"label", "youtube_id", "time_start", "time_end", "split"}
    assert (root / rows[0]["label"] / f"{rows[0]['youtube_id']}_000000_000010.mp4").is_file()
    datamodule = Kinetics600DataModule(root, frames=5, size=32, channels=1)
    assert [len(datamodule.dataset(s)) for s in ("train", "val", "test")] == [170, 10, 70]
    assert datamodule.class_names()[:2] == ["ankle boot", "bag"]


def test_generation_is_skipped_when_done_refused_when_different_and_atomic(generated, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(moving_fmnist, "write_video", fail)
    assert generate(generated["ucf101"], "ucf101", TINY, synthetic_images) == generated["ucf101"]  # nothing written
    with pytest.raises(ConfigError, match="canvas"):
        generate(generated["ucf101"], "ucf101", MovingFMNISTSpec(**{**TINY.__dict__, "canvas": 64}), synthetic_images)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "new", "ucf101", TINY, synthetic_images)
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temporary one


def test_datamodule_from_the_config(fake_fmnist, tmp_path):
    cfg = compose_config(
        [
            "data=moving_fmnist",
            f"paths.runs={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'mfm'}",
            f"data.module.fmnist_root={fake_fmnist}",
            "data.module.search_debian=false",
            "data.module.download_url=file:///nonexistent/",
            "data.module.clips_per_group=1",
            "data.module.video_frames=9",
            "data.frames=5",
            "data.module.val_size=10",
            "data.module.batch_size=4",
        ]
    )
    datamodule = build_datamodule(cfg.data)
    assert isinstance(datamodule, MovingFMNISTDataModule)
    datamodule.prepare_data()
    assert (tmp_path / "mfm" / "ucf101" / "ucfTrainTestlist" / "trainlist01.txt").is_file()
    assert [len(datamodule.dataset(s)) for s in ("train", "val", "test")] == [170, 10, 70]
    assert (tmp_path / "runs" / "data_reports" / "moving_fmnist" / "train_skips.json").is_file()
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (4, 1, 5, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert datamodule.media_info() == {
        "kind": "video",
        "frames": 5,
        "stride": 1,
        "resolution": [32, 32],
        "fps": 25.0,
        "channels": 1,
        "splits": {"layout": "ucf101", "fold": 1, "val_size": 10, "seed": 0},
    }
