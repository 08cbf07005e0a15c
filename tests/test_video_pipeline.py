"""The video path end to end, shrunk: generated clips -> causal tokenizer -> token shards, and its config checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, compose_config
from magnets.cli import check_train_config
from magnets.data.base import build_datamodule, to_unit_float
from magnets.data.shards import open_shard, read_meta
from magnets.errors import ConfigError, MismatchError
from magnets.lit.tokenizer import load_tokenizer
from magnets.pipeline import train


def video_cfg(fake_fmnist, tmp_path, *extra: str):
    """``experiment=moving_fmnist`` up to its token shards, with one clip per group and a tiny tokenizer trained two steps."""
    return compose_config(
        [
            "experiment=moving_fmnist",
            f"paths.runs={tmp_path / 'runs'}",
            f"paths.data={tmp_path / 'data'}",
            f"run_dir={tmp_path / 'runs' / 'run'}",
            f"data.module.fmnist_root={fake_fmnist}",
            "data.module.search_debian=false",
            "data.module.download_url=file:///nonexistent/",
            "data.module.clips_per_group=1",
            "data.module.val_size=10",
            "data.module.batch_size=4",
            "tokenizer.model.channels=[4,8,8]",
            "tokenizer.model.num_res_blocks=1",
            "tokenizer.model.vq_codebook_size=32",
            "tokenizer.codebook.restart_every=1",
            "tokenizer.trainer.max_steps=2",
            "tokenizer.checkpoint_every=1",
            "tokenize.batch_size=16",
            "progress_refresh_rate=0",
            "stages=[tokenizer,tokenize]",
            *extra,
        ]
    )


def test_moving_fmnist_clips_to_token_shards(fake_fmnist, tmp_path):
    cfg = video_cfg(fake_fmnist, tmp_path)
    check_train_config(cfg)
    out = train(cfg)
    assert "maskgit" not in out  # stages=[tokenizer,tokenize]
    shards = {}
    for split, count in (("train", 2 * 170), ("val", 10), ("test", 70)):  # train with mirrored copies
        tokens, labels, meta = open_shard(out["shards"][split], codebook_size=32, grid=[5, 8, 8])
        assert tokens.shape == (count, 320) and int(tokens.max()) < 32 and set(np.unique(labels)) <= set(range(10))
        assert meta.media["kind"] == "video" and meta.media["frames"] == 17 and meta.media["splits"]["fold"] == 1
        shards[split] = (tokens, meta)
    # The shards hold the centre clip of every video, so a rerun of the encoder reproduces them exactly.
    tokenizer = load_tokenizer(out["tokenizer"])
    test_clips = build_datamodule(cfg.data).dataset("test", augment=False)
    first = torch.stack([test_clips[i][0] for i in range(3)])
    np.testing.assert_array_equal(tokenizer.encode(to_unit_float(first)).flatten(1).numpy(), shards["test"][0][:3])

    tokenizer_dir = out["tokenizer"].parent
    metrics = json.loads((tokenizer_dir / "metrics.json").read_text())
    assert metrics["bits_per_pixel"] == pytest.approx(5 * 8 * 8 * math.log2(32) / (17 * 32 * 32))
    assert 0 < metrics["test/codebook_usage"] <= 1 and metrics["test/psnr"] > 0
    assert (tokenizer_dir / "reconstructions" / "test.gif").is_file()

    # A rerun keeps the shards. Another fold selects other training clips: the fold-1 tokenizer is not reused for it
    # (its training key names the fold), and a tokenizer of its own makes new shards.
    train(cfg)
    assert read_meta(out["shards"]["test"]).created == shards["test"][1].created
    with pytest.raises(MismatchError, match=r"was trained with other settings \(data.module.fold: saved 1, now 2\)"):
        train(video_cfg(fake_fmnist, tmp_path, "data.module.fold=2"))
    refold = train(video_cfg(fake_fmnist, tmp_path, "data.module.fold=2", "tokenizer.name=fold2"))
    assert read_meta(refold["shards"]["test"]).media["splits"]["fold"] == 2


def test_tokenizer_geometry_must_match_the_data(fake_fmnist, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.model.frames=17 is not valid; valid: 9, the data's frames"):
        check_train_config(video_cfg(fake_fmnist, tmp_path, "data.frames=9"))
    with pytest.raises(ConfigError, match=r"tokenize.flip_splits='dev' is not valid; valid: train, val, test"):
        check_train_config(video_cfg(fake_fmnist, tmp_path, "tokenize.flip_splits=[train,dev]"))


@pytest.mark.parametrize("experiment", ["ucf101_b", "k600_s"])
def test_real_data_presets_stop_at_once_without_data(experiment, tmp_path):
    """No dataset: one line naming the folder and where to get the data, exit 2, nothing trained."""
    result = subprocess.run(
        [sys.executable, "-m", "magnets.train", f"experiment={experiment}", f"paths.runs={tmp_path}",
         f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    assert lines[0].startswith("error: ") and f"{tmp_path / 'nowhere'} does not exist" in lines[0]
    assert "download" in lines[0] and not (tmp_path / "tokenizers").exists()
