"""Running on clusters: preemption (SIGTERM) saves a checkpoint and exits non-zero, requeued jobs resume, launcher presets."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, compose_config
from magnets import evaluation
from magnets.cli import check_train_config
from magnets.data import fashion_mnist
from magnets.errors import ConfigError
from magnets.pipeline import PREEMPTED_EXIT_STATUS, train
from magnets.runs import own_resume_checkpoint


def preemptible_overrides(fake_fmnist: Path, tmp_path: Path, max_steps: int) -> list[str]:
    return [
        "experiment=fmnist", "tokenizer=tiny", "tokenizer_eval.enabled=false", "model=tiny", "progress_refresh_rate=0",
        "stages=[tokenizer,tokenize,maskgit]", "sample_validation.enabled=false",
        f"paths.runs={tmp_path / 'runs'}", f"run_dir={tmp_path / 'runs' / 'fmnist' / 'job'}",
        f"data.module.root={fake_fmnist}", "data.module.search_debian=false", "data.module.download_url=file:///nonexistent/",
        "data.module.val_size=20", "data.module.batch_size=16", "tokenize.batch_size=32",
        "maskgit.batch_size=8", f"maskgit.trainer.max_steps={max_steps}", "maskgit.trainer.val_check_interval=1000",
        "maskgit.checkpoint_every=1", "maskgit.module.warmup_steps=1",
    ]  # fmt: skip


def test_sigterm_saves_interrupted_checkpoint_exits_nonzero_and_a_rerun_in_the_job_directory_resumes(
    fake_fmnist, tmp_path, caplog
):
    checkpoints = tmp_path / "runs" / "fmnist" / "job" / "checkpoints"
    env = {**os.environ, "TEST_PAYLOAD_SHA256": json.dumps(fashion_mnist.PAYLOAD_SHA256), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("ddp_train.py")  # runs magnets.pipeline.train on the overrides, in one process here
    overrides = preemptible_overrides(fake_fmnist, tmp_path, max_steps=100_000)
    job = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "last.ckpt").is_file():  # the MaskGIT stage is stepping
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no MaskGIT checkpoint within 300 s"
            time.sleep(0.5)
        job.send_signal(signal.SIGTERM)  # what a scheduler sends to preempt a job
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == PREEMPTED_EXIT_STATUS, stderr.decode()[-3000:]
    assert "stopped by SIGTERM" in stderr.decode()
    interrupted = torch.load(checkpoints / "interrupted.ckpt", weights_only=False)
    stopped_at = interrupted["global_step"]
    assert 1 <= stopped_at < 100_000
    assert own_resume_checkpoint(checkpoints.parent) == checkpoints / "interrupted.ckpt"  # the newest

    # The requeued job starts again in the same directory (no resume=...) and continues from the interrupted step.
    with caplog.at_level(logging.INFO, logger="magnets.pipeline"):
        out = train(compose_config(preemptible_overrides(fake_fmnist, tmp_path, max_steps=stopped_at + 2)))
    assert f"resuming from {checkpoints / 'interrupted.ckpt'}" in caplog.text
    module = out["maskgit"]["module"]
    assert module.trainer.global_step == stopped_at + 2
    assert torch.load(out["maskgit"]["checkpoint"], weights_only=False)["global_step"] == stopped_at + 2


def test_own_resume_checkpoint_takes_the_newest_of_last_interrupted_and_slurm_hpc(tmp_path):
    assert own_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    paths = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "checkpoints" / "interrupted.ckpt"]
    for age, path in enumerate(paths):
        path.write_bytes(b"")
        os.utime(path, ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
        assert own_resume_checkpoint(tmp_path) == path


def test_trainer_presets_and_the_slurm_launcher_compose():
    presets = (("gpu", "auto", "bf16-mixed"), ("ddp", "ddp", "32-true"), ("fsdp", "fsdp", "bf16-mixed"))
    for trainer, strategy, precision in presets:
        cfg = compose_config(["experiment=imagenet_b", f"trainer={trainer}", "trainer.num_nodes=4"])
        assert (cfg.trainer.strategy, cfg.trainer.precision, cfg.trainer.num_nodes) == (strategy, precision, 4)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.max_num_timeout) == (4, 3)  # one task per GPU; resubmitted when preempted


def test_fsdp_on_cpus_is_refused_before_any_stage_runs(tmp_path):
    cfg = compose_config(["trainer=fsdp", "trainer.accelerator=cpu", f"paths.runs={tmp_path}"])
    with pytest.raises(ConfigError, match=r"trainer.accelerator='cpu' is not valid; valid: gpu or auto: Lightning's FSDP"):
        check_train_config(cfg)


def test_bf16_mixed_training_validates_with_the_transformer_decoding_under_bf16(tiny_cfg, monkeypatch):
    """The GPU presets' precision, run on the CPU: training steps and the validation decode under bf16 autocast."""
    seen: list[torch.dtype | None] = []
    generate = evaluation.generate_samples

    def recording(*args, **kwargs):
        seen.append(kwargs.get("autocast_dtype"))
        return generate(*args, **kwargs)

    monkeypatch.setattr("magnets.lit.sampling_validation.generate_samples", recording)
    tiny_cfg.trainer.precision = "bf16-mixed"
    out = train(tiny_cfg)
    assert seen and set(seen) == {torch.bfloat16}
    callback = next(c for c in out["maskgit"]["module"].trainer.callbacks if type(c).__name__ == "SamplingValidation")
    assert all(torch.isfinite(torch.tensor(v)) for k, v in callback.last_metrics.items() if k.startswith("val/fid/"))
