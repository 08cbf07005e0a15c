"""Nested MaskGIT training: masking, distillation losses, optimizer groups, resume, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from magnets.cli import check_train_config
from magnets.data import fashion_mnist
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError, MismatchError
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import mask_ratio, random_training_mask
from magnets.pipeline import train
from magnets.runs import check_resume_compatible

MODEL = dict(codebook_size=16, grid=[8], num_classes=3, dim=32, depth=1, heads=1, mlp_dim=32, widths=[8, 4, 2, 1])


def test_mask_ratio_schedules():
    for schedule in ("cosine", "linear", "square_root", "arccos"):
        assert mask_ratio(0.0, schedule) == pytest.approx(1.0) and mask_ratio(1.0, schedule) == pytest.approx(0.0)
        assert mask_ratio(0.3, schedule) > mask_ratio(0.6, schedule)
    assert mask_ratio(0.5, "cosine") == pytest.approx(math.cos(math.pi / 4))
    with pytest.raises(ValueError, match=r"unknown mask schedule 'exp'; valid: \['arccos', 'cosine', 'linear', 'square_root'\]"):
        mask_ratio(0.5, "exp")


def test_training_mask_masks_at_least_one_and_is_seeded():
    masks = random_training_mask(500, 8, generator=torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert counts.min() >= 1 and counts.max() <= 8
    assert (counts == 8).any() and (counts < 4).any()  # ratios spread over the cosine schedule
    again = random_training_mask(500, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def losses_for(distill: str, alpha: float) -> dict[int, float]:
    torch.manual_seed(0)
    module = NestedMaskGITModule(model=MODEL, distill=distill)
    tokens = torch.randint(0, 16, (4, 8))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :5] = True
    inputs = tokens.masked_fill(mask, 16)
    out = module.width_losses(inputs, tokens, mask, torch.zeros(4, dtype=torch.long), alpha)
    return {p: loss.item() for p, (loss, _) in out.items()}


def test_distillation_changes_only_the_smaller_widths():
    gt = losses_for("none", alpha=0.0)
    distilled = losses_for("progressive", alpha=0.0)
    assert distilled[1] == gt[1]  # m_1 always learns from the ground truth
    assert all(distilled[p] != gt[p] for p in (2, 4, 8))
    assert losses_for("progressive", alpha=1.0) == gt  # alpha = 1: ground truth only


def test_soft_targets_are_detached():
    module = NestedMaskGITModule(model=MODEL, distill="progressive")
    tokens = torch.randint(0, 16, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    losses = module.width_losses(tokens.masked_fill(mask, 16), tokens, mask, torch.zeros(2, dtype=torch.long), alpha=0.0)
    losses[8][0].backward()  # m_8's loss against m_4's soft targets
    head = module.model.head.weight.grad
    assert head[:, 4:].abs().max() == 0  # nothing flows into m_4's extra columns through the teacher


def test_alpha_decays_linearly_and_unknown_distill_is_refused():
    module = NestedMaskGITModule(model=MODEL, alpha_decay_steps=10)
    assert module.alpha() == 1.0
    assert [module.alpha(step) for step in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"unknown distill mode 'self'; valid: \['progressive', 'none'\]"):
        NestedMaskGITModule(model=MODEL, distill="self")


def test_no_weight_decay_on_norms_biases_embeddings():
    module = NestedMaskGITModule(model=MODEL)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    optimizer = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in module.model.named_parameters() if id(p) in decayed}
    linear_weights = {f"{name}.weight" for name, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == linear_weights and "head.weight" in names
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.model.parameters()))


def record_losses(monkeypatch) -> list[tuple[int, float]]:
    """Patch the training step to record (global step, loss) pairs."""
    seen: list[tuple[int, float]] = []
    step = NestedMaskGITModule.training_step

    def recording_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        seen.append((self.global_step, loss.item()))
        return loss

    monkeypatch.setattr(NestedMaskGITModule, "training_step", recording_step)
    return seen


@pytest.mark.parametrize("width", [1, 8])  # plain MaskGIT; the distillation ablation's m_8 trained alone (single_8)
def test_single_width_plain_maskgit_trains(tiny_cfg, width):
    tiny_cfg.model.widths = [width]
    tiny_cfg.distill.mode = "none"
    out = train(tiny_cfg)
    assert set(k for k in out["maskgit"]["metrics"] if k.startswith("val/loss/")) == {f"val/loss/p{width}"}
    model = out["maskgit"]["module"].model
    assert load_schedule(f"m{width}_12" if width > 1 else "maskgit_12").width_per_step(model.cfg.widths) == [width] * 12
    with pytest.raises(ValueError, match=r"names widths \[4, 2, 1\]|names widths \[8, 4, 2\]"):
        load_schedule("magnets_3333").width_per_step(model.cfg.widths)  # widths it never trained are refused


def test_killed_and_resumed_run_continues_the_unbroken_loss_curve(tiny_cfg, tmp_path):
    tiny_cfg.maskgit.trainer.max_steps = 6
    with pytest.MonkeyPatch.context() as patch:
        unbroken = record_losses(patch)
        train(tiny_cfg)

    tiny_cfg.name = "resumed"
    tiny_cfg.run_dir = str(tmp_path / "runs" / "resumed" / "first")
    step = NestedMaskGITModule.training_step

    def crash_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated kill")
        return step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="simulated kill"):
        patch.setattr(NestedMaskGITModule, "training_step", crash_at_step_3)
        train(tiny_cfg)

    tiny_cfg.resume = "last"
    tiny_cfg.run_dir = str(tmp_path / "runs" / "resumed" / "second")
    with pytest.MonkeyPatch.context() as patch:
        resumed = record_losses(patch)
        out = train(tiny_cfg)
    assert [s for s, _ in resumed] == [s for s, _ in unbroken[3:]] == [3, 4, 5]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in unbroken[3:]], rel=1e-6)
    assert torch.load(out["maskgit"]["checkpoint"], weights_only=False)["global_step"] == 6


def test_ctrl_c_saves_the_interrupted_checkpoint_and_exits_130(tiny_cfg, caplog):
    step = NestedMaskGITModule.training_step

    def interrupt_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(NestedMaskGITModule, "training_step", interrupt_at_step_2)
        train(tiny_cfg)
    assert exit_info.value.code == 130
    interrupted = Path(tiny_cfg.run_dir) / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=False)["global_step"] == 2
    assert f"interrupted (Ctrl-C) at step 2; checkpoint in {interrupted.parent}" in caplog.text


def test_resume_takes_the_runs_folder_given_relative_or_absolute(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = OmegaConf.to_container(tiny_cfg, resolve=True)
    tokens = Path(config["tokenize"]["out_dir"])
    assert tokens.is_absolute()
    checkpoint = tmp_path / "saved.ckpt"
    for saved_out_dir in (os.path.relpath(tokens, tmp_path), "elsewhere/tokens"):
        config["tokenize"]["out_dir"] = saved_out_dir
        torch.save({"hyper_parameters": {"model": {}}, "state_dict": {}, "config": config}, checkpoint)
        if saved_out_dir.startswith("elsewhere"):
            with pytest.raises(MismatchError, match=r"other settings \(tokenize.out_dir: checkpoint elsewhere/tokens, now /"):
                check_resume_compatible(checkpoint, tiny_cfg)
        else:
            check_resume_compatible(checkpoint, tiny_cfg)  # the same folder, written relative


def test_resume_names_what_is_missing(tiny_cfg):
    tiny_cfg.resume = "last"
    with pytest.raises(ConfigError, match=r"resume='last' is not valid; .*checkpoints/last.ckpt exists"):
        check_train_config(tiny_cfg)  # found before any stage runs
    with pytest.raises(ConfigError, match=r"resume='last' is not valid; .*checkpoints/last.ckpt exists"):
        train(tiny_cfg)


def test_resume_from_a_truncated_checkpoint_is_refused_before_any_stage(tiny_cfg, tmp_path):
    saved = tmp_path / "runs" / tiny_cfg.name / "earlier" / "checkpoints" / "last.ckpt"
    saved.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(64)}, "global_step": 3}, saved)
    saved.write_bytes(saved.read_bytes()[:200])  # cut, as a killed copy or a full disk leaves it
    tiny_cfg.resume = "last"  # the only checkpoint is cut: passed over, and named
    with pytest.raises(ConfigError, match=r"^resume='last' is not valid; .*passed over: .*last.ckpt \(not a whole checkpoint"):
        check_train_config(tiny_cfg)
    tiny_cfg.resume = str(saved)
    with pytest.raises(MismatchError, match=r"^resume='.*last.ckpt': .*last.ckpt is not a readable checkpoint \(truncated"):
        check_train_config(tiny_cfg)
    tiny_cfg.resume = str(saved)
    with pytest.raises(MismatchError, match=r"is not a readable checkpoint"):
        check_resume_compatible(saved, tiny_cfg)  # the later full read names the file too


def test_two_process_ddp_run_keeps_ranks_identical(fake_fmnist, tmp_path):
    overrides = [
        "experiment=fmnist", "tokenizer=tiny", "tokenizer_eval.enabled=false", "model=tiny", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "progress_refresh_rate=0",
        f"paths.runs={tmp_path / 'runs'}", f"run_dir={tmp_path / 'runs' / 'ddp'}",
        f"data.module.root={fake_fmnist}", "data.module.search_debian=false", "data.module.download_url=file:///nonexistent/",
        "data.module.val_size=20", "data.module.batch_size=8", "tokenize.batch_size=32",
        "maskgit.batch_size=8", "maskgit.trainer.max_steps=3", "maskgit.trainer.val_check_interval=3",
        "maskgit.module.warmup_steps=1",
    ]  # fmt: skip
    # The synthetic files' checksums are patched in this process only: the workers get them too.
    env = {**os.environ, "TEST_PAYLOAD_SHA256": json.dumps(fashion_mnist.PAYLOAD_SHA256)}
    script = Path(__file__).with_name("ddp_train.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *overrides], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert not set(saved[0]["first_batch"]) & set(saved[1]["first_batch"])  # the ranks read different items
    rank0, rank1 = (s["state_dict"] for s in saved)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # each rank saw other batches: gradients were synced
    checkpoint = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert all(torch.equal(checkpoint["state_dict"][k], rank0[k]) for k in rank0)


def test_ema_run_delivers_averaged_weights(tiny_cfg, tmp_path):
    plain = train(tiny_cfg)["maskgit"]["module"].state_dict()
    tiny_cfg.maskgit.ema_decay = 0.5
    tiny_cfg.run_dir = str(tmp_path / "runs" / "fmnist" / "ema")
    out = train(tiny_cfg)
    averaged = out["maskgit"]["module"].state_dict()
    saved = torch.load(out["maskgit"]["checkpoint"], weights_only=False)["state_dict"]
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)  # same seed and data: only the averaging differs
    assert all(torch.equal(saved[k], averaged[k]) for k in averaged)


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_cfg, tmp_path):
    train(tiny_cfg)
    tiny_cfg.resume = "last"
    tiny_cfg.distill.mode = "none"
    tiny_cfg.run_dir = str(tmp_path / "runs" / "fmnist" / "run2")
    with pytest.raises(ValueError, match=r"cannot resume from .*last.ckpt: .*distill: checkpoint \{'mode': 'progressive'"):
        train(tiny_cfg)
