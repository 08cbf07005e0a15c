"""Video generation end to end, shrunk: the paper presets (ucf101_b, k600_b) on generated clips in their real layouts,
and the embedded experiments through evaluate and sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, compose_config, synthetic_split
from magnets.cli import check_train_config
from magnets.data.moving_fmnist import MovingFMNISTSpec, generate
from magnets.data.shards import open_shard
from magnets.evaluate import evaluate
from magnets.metrics.fvd import FVD_DOMAIN_LABEL
from magnets.pipeline import train
from magnets.sample import sample


def synthetic_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like ``train`` / ``test`` images ``[N, 28, 28]`` and labels ``[N]``, every class 20 / 6 times."""
    images, _ = synthetic_split(200 if split == "train" else 60, seed=0 if split == "train" else 1)
    return images, np.arange(len(images)) % 10


SPEC = MovingFMNISTSpec(canvas=32, item_size=16, num_items=1, video_frames=10, clips_per_group=1, seed=1)


def shrunk(experiment: str, tmp_path, data_root, *extra: str):
    """``experiment`` with a tiny causal tokenizer (9x32x32 grey clips -> 3x8x8 tokens), model tiny, 2 steps, one validation."""
    return compose_config(
        [
            f"experiment={experiment}",
            "trainer=cpu",
            "model=tiny",
            f"paths.runs={tmp_path / 'runs'}",
            f"run_dir={tmp_path / 'runs' / experiment / 'run'}",
            f"data.root={data_root}",
            "data.frames=9",
            "data.image_size=32",
            "data.channels=1",
            "data.module.batch_size=8",
            "data.module.num_workers=0",
            "data.module.scan_workers=1",
            "tokenizer.model.in_channels=1",
            "tokenizer.model.frames=9",
            "tokenizer.model.image_size=32",
            "tokenizer.model.channels=[4,8,8]",
            "tokenizer.model.num_res_blocks=1",
            "tokenizer.model.fsq_levels=[4,4]",
            "tokenizer.trainer.max_steps=2",
            "tokenizer.checkpoint_every=1",
            "tokenizer.model.level_res_blocks=0",
            "tokenize.batch_size=16",
            "tokenize.num_workers=0",
            "tokenize.device=cpu",
            "classifier.epochs=1",
            "maskgit.batch_size=8",
            "maskgit.num_workers=0",
            "maskgit.checkpoint_every=2",
            "maskgit.trainer.max_steps=2",
            "maskgit.trainer.val_check_interval=2",
            "maskgit.module.warmup_steps=1",
            "sample_validation.samples=6",
            "sample_validation.batch_size=6",
            "trainer.log_every_n_steps=1",
            "progress_refresh_rate=0",
            *extra,
        ]
    )


def logged(run_dir) -> tuple[dict[str, float], set[str]]:
    """The last value of every scalar tag, and the image tags, of a run's TensorBoard events."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return scalars, set(events.Tags()["images"])


@pytest.mark.parametrize(
    ("experiment", "layout", "given"),
    [("ucf101_b", "ucf101", 0), ("k600_b", "kinetics600", 2 * 64)],  # k600: 5 of 9 frames = 2 of 3 latent frames given
)
def test_paper_presets_run_end_to_end_on_generated_clips_in_their_real_layouts(experiment, layout, given, tmp_path):
    data_root = generate(tmp_path / layout, layout, SPEC, synthetic_images)
    # The generated UCF101 folder lists the 10 Fashion-MNIST classes in its classInd.txt, which data.num_classes must match.
    ucf101 = ["data.module.val_size=20", "data.num_classes=10"]
    extra = ["maskgit.trainer.precision=32-true", *(ucf101 if layout == "ucf101" else [])]
    cfg = shrunk(experiment, tmp_path, data_root, *extra)
    check_train_config(cfg)
    out = train(cfg)
    tokens, labels, meta = open_shard(out["shards"]["train"])
    assert meta.grid == [3, 8, 8] and meta.media["kind"] == "video" and tokens.shape[1] == 192
    module = out["maskgit"]["module"]
    assert module.task.given_tokens == given and module.task.use_class == (given == 0)
    scalars, images = logged(Path(cfg.run_dir))
    for schedule in ("maskgit_12", "magnets_3333"):
        assert np.isfinite(scalars[f"val/fvd/{schedule}"]) and scalars[f"val/fvd/{schedule}"] >= 0
        assert 0 <= scalars[f"val/class_acc/{schedule}"] <= 1
        assert scalars[f"val/gflops/{schedule}"] > 0
        assert f"val/fid/{schedule}" not in scalars
        assert f"val/samples/{schedule}" in images  # the clips' frame strip
    assert {f"val/samples_width/p{p}" for p in (8, 4, 2, 1)} <= images
    assert scalars["val/gflops/magnets_3333"] < scalars["val/gflops/maskgit_12"]
    saved = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert set(saved) >= {"val/loss/p1", "val/loss/p8"}


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory):
    """moving_fmnist and moving_fmnist_fp, shrunk, trained once (they share clips, tokenizer, shards and classifier)."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    data_root = generate(tmp_path / "clips" / "ucf101", "ucf101", SPEC, synthetic_images).parent
    data = [f"data.module.video_frames={SPEC.video_frames}", "data.module.clips_per_group=1", "data.module.val_size=10",
            "data.module.generate=false", "data.module.layout=ucf101"]  # fmt: skip
    runs = {}
    for experiment in ("moving_fmnist", "moving_fmnist_fp"):
        cfg = shrunk(experiment, tmp_path, data_root, *data, "tokenizer.model.quantizer=fsq")
        train(cfg)
        runs[experiment] = cfg
    return runs


@pytest.mark.parametrize("experiment", ["moving_fmnist", "moving_fmnist_fp"])
def test_evaluate_writes_an_fvd_row_and_sample_keeps_the_given_frames(embedded_runs, experiment, capsys):
    cfg = embedded_runs[experiment]
    runs = cfg.paths.runs
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [f"name={experiment}", f"paths.runs={runs}", "samples=12", "batch_size=6", "reference.count=10",
                "reference.split=val", "extractor=domain"]  # fmt: skip
        cached = evaluate(compose("evaluate", overrides=[*base, "schedule=magnets_3333"]))
        baseline = evaluate(compose("evaluate", overrides=[*base, "schedule=maskgit_12", "decode.cache=none"]))
        printed = capsys.readouterr().out
        summary = sample(compose("sample", overrides=[f"name={experiment}", f"paths.runs={runs}", "samples_per_class=1",
                                                      "condition_split=val", "batch_size=5"]))  # fmt: skip
    with open(f"{runs}/{experiment}/results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["schedule"] for r in rows] == ["magnets_3333", "maskgit_12"]
    task = "frame_pred" if experiment.endswith("_fp") else "class_cond"
    assert all(r["task"] == task and r["extractor"] == "video_classifier" and r["fid"] == "" for r in rows)
    assert float(rows[0]["fvd"]) >= 0 and 0 <= float(rows[0]["class_acc"]) <= 1
    assert cached["gflops_per_sample"] < baseline["gflops_per_sample"]
    assert FVD_DOMAIN_LABEL in printed
    grid = cfg.paths.runs + f"/{experiment}/" + rows[0]["grid"]
    assert grid.endswith("_frames.png") and open(grid, "rb").read(4) == b"\x89PNG"
    names = sorted(path.name for path in summary["media_files"])
    expected = ["grid.gif", "grid_frames.png"] + (["real.gif", "real_frames.png"] if task == "frame_pred" else [])
    assert names == expected
    if task == "frame_pred":  # every sample continues its real clip: the given latent frames are the shard's
        shard_tokens, _, _ = open_shard(f"{cfg.tokenize.out_dir}/val")
        given = 2 * 64  # 1 + 4*1 frames of 9 -> the first 2 latent frames of 3, 8x8 tokens each
        assert np.array_equal(summary["tokens"][:, :given].numpy(), shard_tokens[: len(summary["tokens"]), :given])
