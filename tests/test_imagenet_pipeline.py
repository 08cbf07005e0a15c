"""`make train EXP=imagenet_s` end to end on the CPU, shrunk: ILSVRC folders, MaskGIT VQGAN weights by path, FID validation.

The real entry point (``python -m magnets.train experiment=imagenet_s``) runs
on a generated ILSVRC2012-layout folder (one file unreadable) with a small
VQGAN whose weights file has the public file's key layout: the weights are
wrapped as the tokenizer checkpoint, the JPEGs become token shards, MaskGIT
trains 2 steps and one validation measures FID with the offline Inception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_config
from magnets.data.shards import TokenDataset
from magnets.files import file_sha256
from magnets.models.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig
from magnets.pipeline import tokenize_command

REPO = Path(__file__).resolve().parents[1]
WNIDS = ("n01530575", "n02085620")
SMALL_VQGAN = {"image_size": 32, "base_channels": 8, "channel_mult": [1, 1, 2], "num_res_blocks": 1, "code_dim": 8}
SMALL_VQGAN |= {"codebook_size": 64, "norm_groups": 4, "in_channels": 3}


def write_ilsvrc(root: Path, train_per_class: int = 16, val_per_class: int = 6) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` of 48x36 noise images; the first train file truncated."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
                pixels[..., label] //= 4  # a class tint
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    broken = root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    return broken


@pytest.mark.parametrize("experiment", ["imagenet_s"])
def test_make_train_imagenet_runs_end_to_end_on_generated_folders(experiment, tmp_path):
    broken = write_ilsvrc(tmp_path / "ILSVRC2012")
    torch.manual_seed(0)
    weights = tmp_path / "maskgit-vqgan-small.bin"
    torch.save(MaskGITVQGAN(MaskGITVQGANConfig(**SMALL_VQGAN)).state_dict(), weights)
    run_dir = tmp_path / "runs" / experiment / "run"
    overrides = [
        f"experiment={experiment}", "trainer=cpu", "model=tiny", "progress_refresh_rate=0",
        f"paths.runs={tmp_path / 'runs'}", f"paths.data={tmp_path / 'data'}", f"run_dir={run_dir}",
        f"data.module.root={tmp_path / 'ILSVRC2012'}", "data.image_size=32", "data.num_classes=2", "data.module.num_workers=0",
        f"tokenizer.weights={weights}", *[f"tokenizer.model.{k}={v}" for k, v in SMALL_VQGAN.items() if k != "image_size"],
        "tokenize.items_per_shard=10", "tokenize.num_workers=0", "tokenize.batch_size=8",
        "maskgit.batch_size=8", "maskgit.num_workers=0", "maskgit.trainer.max_steps=2", "maskgit.trainer.val_check_interval=2",
        "maskgit.trainer.precision=32-true", "maskgit.checkpoint_every=2", "maskgit.module.warmup_steps=1",
        "maskgit.ema_decay=null", "sample_validation.samples=20", "sample_validation.batch_size=10",
        "sample_validation.reference_count=12", "hydra.run.dir=" + str(tmp_path / "hydra"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "magnets.train", *overrides], cwd=REPO, capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]

    # The public-layout weights became the tokenizer checkpoint, recording their file and sha256.
    tokenizer_ckpt = tmp_path / "runs" / "tokenizers" / "imagenet_vqgan" / "tokenizer.ckpt"
    hparams = torch.load(tokenizer_ckpt, weights_only=False)["hyper_parameters"]
    assert (hparams["kind"], hparams["weights"]) == ("maskgit_vqgan", str(weights))

    # JPEGs -> shards of 10 source images: the unreadable file reported, the rest tokenized (train with flipped copies).
    tokens = tmp_path / "data" / "imagenet" / "tokens"
    train, val = TokenDataset(tokens / "train"), TokenDataset(tokens / "val")
    assert (len(train), len(val)) == (2 * (2 * 16 - 1), 2 * 6)
    assert train.meta.grid == [8, 8] and train.meta.codebook_size == 64
    report = json.loads((tokens / "train" / "report.json").read_text())
    assert [Path(item["path"]) for item in report["unreadable"]] == [broken]

    # Two steps, then one validation that decoded with each schedule and measured FID with the Inception.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    for schedule in ("maskgit_12", "magnets_3333"):
        assert np.isfinite(scalars[f"val/fid/{schedule}"]) and scalars[f"val/fid/{schedule}"] > 0
        assert scalars[f"val/gflops/{schedule}"] > 0
        assert f"val/samples/{schedule}" in events.Tags()["images"]
    assert not any(tag.startswith("val/class_acc") for tag in scalars)  # no project classifier for ImageNet
    stats = list((tmp_path / "runs" / "fid_stats").glob("imagenet32__val-12__3x32x32__inception_offline__*.npz"))
    assert len(stats) == 1  # the real side's statistics, cached for the next validation or run


def test_machines_tokenizing_side_by_side_each_wrap_the_weights_into_the_same_tokenizer(tmp_path):
    """``python -m magnets.tokenize tokenize.rank=R tokenize.world_size=2`` on two machines with their own runs folders."""
    broken = write_ilsvrc(tmp_path / "ILSVRC2012", train_per_class=10, val_per_class=3)
    torch.manual_seed(0)
    weights = tmp_path / "maskgit-vqgan-small.bin"
    torch.save(MaskGITVQGAN(MaskGITVQGANConfig(**SMALL_VQGAN)).state_dict(), weights)
    tokens = tmp_path / "shared" / "tokens"
    for rank in (1, 0):  # rank 1 first: the split is complete only after rank 0
        cfg = compose_config([
            "experiment=imagenet_s", f"paths.runs={tmp_path / f'machine{rank}'}", f"tokenize.out_dir={tokens}",
            f"data.module.root={tmp_path / 'ILSVRC2012'}", "data.image_size=32", "data.num_classes=2",
            f"tokenizer.weights={weights}", *[f"tokenizer.model.{k}={v}" for k, v in SMALL_VQGAN.items() if k != "image_size"],
            "tokenize.items_per_shard=6", "tokenize.num_workers=0", "tokenize.batch_size=8", "tokenize.flip_splits=[]",
            f"tokenize.rank={rank}", "tokenize.world_size=2",
        ])  # fmt: skip
        tokenize_command(cfg)
    wrapped = [tmp_path / f"machine{rank}" / "tokenizers" / "imagenet_vqgan" / "tokenizer.ckpt" for rank in (0, 1)]
    assert file_sha256(wrapped[0]) == file_sha256(wrapped[1])  # the same bytes, wrapped on each machine
    train = TokenDataset(tokens / "train")  # refused if the two machines' shards named different tokenizers
    assert len(train) == 2 * 10 - 1 and train.meta.tokenizer_sha256 == file_sha256(wrapped[0])
    assert sorted(p.name for p in (tokens / "train").glob("shard-*")) == [f"shard-0000{i}" for i in range(4)]
    report = json.loads((tokens / "train" / "report.json").read_text())
    assert [Path(item["path"]) for item in report["unreadable"]] == [broken]


def test_a_multirun_through_the_submitit_launcher_trains_one_run_per_job(tmp_path):
    """The cluster path on one machine: Hydra's submitit launcher (local executor) runs one job per seed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    write_ilsvrc(tmp_path / "ILSVRC2012", train_per_class=8, val_per_class=2)
    torch.manual_seed(0)
    weights = tmp_path / "maskgit-vqgan-small.bin"
    torch.save(MaskGITVQGAN(MaskGITVQGANConfig(**SMALL_VQGAN)).state_dict(), weights)
    sweep = tmp_path / "sweep"
    overrides = [
        "-m", "hydra/launcher=submitit_local", "experiment=imagenet_s", "trainer=cpu", "model=tiny", "seed=0,1",
        "progress_refresh_rate=0", f"paths.runs={tmp_path / 'runs'}", f"paths.data={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}", f"data.module.root={tmp_path / 'ILSVRC2012'}", "data.image_size=32",
        "data.num_classes=2", "data.module.num_workers=0", f"tokenizer.weights={weights}",
        *[f"tokenizer.model.{k}={v}" for k, v in SMALL_VQGAN.items() if k != "image_size"],
        "tokenize.num_workers=0", "maskgit.batch_size=4", "maskgit.num_workers=0", "maskgit.trainer.max_steps=2",
        "maskgit.trainer.val_check_interval=2", "maskgit.trainer.precision=32-true", "maskgit.ema_decay=null",
        "sample_validation.enabled=false",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The shards first (as on a cluster: the jobs of a sweep then share them), then the sweep.
    shards_first = [o for o in overrides if o not in ("-m", "seed=0,1")] + ["stages=[tokenizer,tokenize]"]
    for args in (shards_first, overrides):
        result = subprocess.run(
            [sys.executable, "-m", "magnets.train", *args], cwd=REPO, capture_output=True, text=True, timeout=900, env=env
        )
        assert result.returncode == 0, result.stderr[-4000:]
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit
    for job in ("0", "1"):  # each job trained in its own sweep subdirectory, its run_dir
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["global_step"] == 2 and checkpoint["config"]["seed"] == int(job)
