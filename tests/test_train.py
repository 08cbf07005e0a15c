"""The default experiment end to end at tiny scale: tokenizer, checkpoint with config, shards, skips."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_config
from magnets.data.shards import open_shard
from magnets.errors import ConfigError
from magnets.files import file_sha256
from magnets.lit.tokenizer import TokenizerModule
from magnets.pipeline import train


def test_train_then_rerun_skips(tiny_cfg):
    out = train(tiny_cfg)
    tok_dir = tiny_cfg.tokenizer.dir
    ckpt = out["tokenizer"]
    assert str(ckpt) == f"{tok_dir}/tokenizer.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["config"]["tokenizer"]["model"] == OmegaConf.to_container(tiny_cfg.tokenizer.model, resolve=True)
    assert saved["global_step"] == tiny_cfg.tokenizer.trainer.max_steps
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert {"test/psnr", "test/codebook_usage", "test/perplexity"} <= set(metrics)

    counts = {"train": 100 * 2, "val": 20, "test": 40}  # train gets flipped copies
    for split, count in counts.items():
        tokens, labels, meta = open_shard(out["shards"][split], codebook_size=64, grid=[8, 8])
        assert tokens.shape == (count, 64) and meta.tokenizer_sha256 == file_sha256(ckpt)
        assert meta.flip_augmented == (split == "train")
    tokens, labels, _ = open_shard(out["shards"]["train"])
    np.testing.assert_array_equal(labels[:100], labels[100:])
    assert (tokens[:100] != tokens[100:]).any()  # flipped images give other tokens
    assert any(p.name.startswith("events.out.tfevents") for p in (ckpt.parent / "tensorboard").iterdir())

    maskgit = torch.load(out["maskgit"]["checkpoint"], map_location="cpu", weights_only=False)
    assert maskgit["global_step"] == tiny_cfg.maskgit.trainer.max_steps
    tiny = {"size": "tiny", "dim": 96, "depth": 2, "heads": 2, "mlp_dim": 384, "widths": [8, 4, 2, 1]}  # conf/model/tiny.yaml
    assert maskgit["config"]["model"] == tiny
    assert maskgit["hyper_parameters"]["model"]["codebook_size"] == 64
    assert {f"val/loss/p{p}" for p in (8, 4, 2, 1)} <= set(out["maskgit"]["metrics"])

    # Validation-time sampling: per-schedule scalars and grids, per-width grids, read back from the event files.
    events = EventAccumulator(str(Path(tiny_cfg.run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    for schedule in ("maskgit_12", "magnets_3333"):
        assert {f"val/fid/{schedule}", f"val/class_acc/{schedule}", f"val/gflops/{schedule}"} <= scalars
        assert f"val/samples/{schedule}" in images
        assert len(events.Scalars(f"val/fid/{schedule}")) == 3  # validations at steps 2 and 4, and the final one
    assert {f"val/samples_width/p{p}" for p in (8, 4, 2, 1)} <= images
    gflops = {s: events.Scalars(f"val/gflops/{s}")[-1].value for s in ("maskgit_12", "magnets_3333")}
    assert gflops["magnets_3333"] < gflops["maskgit_12"]
    assert Path(tiny_cfg.classifier.path).is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in [ckpt] + [out["shards"][s] / "shard-00000" / "tokens.npy" for s in counts]}
    tiny_cfg.maskgit.trainer.max_steps = 0  # second run: tokenizer and shards up to date
    train(tiny_cfg)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_existing_tokenizer_with_other_architecture_is_refused(tiny_cfg):
    train(tiny_cfg)
    tiny_cfg.tokenizer.model.code_dim = 4
    with pytest.raises(ValueError, match=r"another model config \(fields \['code_dim'\]: saved \[8\], configured \[4\]\)"):
        train(tiny_cfg)


def test_crashed_tokenizer_training_resumes_where_it_stopped(tiny_cfg, monkeypatch):
    step = TokenizerModule.training_step

    def crash_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(TokenizerModule, "training_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg)
    last = Path(tiny_cfg.tokenizer.dir) / "checkpoints" / "interrupted.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3  # saved at the crash
    assert not (Path(tiny_cfg.tokenizer.dir) / "tokenizer.ckpt").exists()

    resumed_from = []
    fit = L.Trainer.fit

    def recording_fit(self, *args, ckpt_path=None, **kwargs):
        resumed_from.append(ckpt_path)
        return fit(self, *args, ckpt_path=ckpt_path, **kwargs)

    monkeypatch.setattr(TokenizerModule, "training_step", step)
    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    out = train(tiny_cfg)
    assert resumed_from[0] == last
    assert torch.load(out["tokenizer"], map_location="cpu", weights_only=False)["global_step"] == 4
    assert not last.exists()  # removed once the resumed run finished


@pytest.mark.parametrize("experiment", ["imagenet_s", "imagenet_b"])
def test_paper_scale_presets_fail_fast_naming_the_missing_shards(experiment, tmp_path):
    paths = [f"paths.data={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"]
    shards_only = ["data.pretokenized=true", "sample_validation.enabled=false"]  # no JPEG folders
    cfg = compose_config([f"experiment={experiment}", *paths, *shards_only])
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/data/imagenet/tokens/train, .*/tokens/val holds none"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # failed before any work


@pytest.mark.parametrize("experiment", ["imagenet_s", "imagenet_b"])
def test_paper_scale_presets_without_the_vqgan_weights_say_which_key_to_set(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.runs={tmp_path / 'runs'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"tokenizer.weights=None is not valid; valid: the path of the maskgit_vqgan weights"):
        train(cfg)
    assert not (tmp_path / "run").exists()
