"""Decode a grid of samples from a trained checkpoint with a model schedule: one row per class, or predicted clips.

    python -m magnets.sample [name=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
    make sample EXP=fmnist ARGS="schedule=maskgit_12 decode.cache=none"

Writes the samples through the media writer (``grid.png`` for images, one
row per class; ``grid.gif`` and ``grid_frames.png`` for clips; under frame
prediction also ``real.gif`` / ``real_frames.png``, the clips the predictions
continue) and ``samples.npz`` (tokens, labels, schedule, cache, GFLOPs per
sample) to ``out_dir`` (default: the checkpoint's run directory,
``samples/<schedule>_<cache>/``) and prints the GFLOPs per sample against the
uncached full-model baseline with the same number of steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from magnets.cli import check_policy_fits, check_sample_config, check_schedule, run_entry
from magnets.data.shards import TokenDataset
from magnets.decoding.flops import decode_flops_per_sample
from magnets.decoding.loop import DECODE_DTYPES, SamplingSettings
from magnets.decoding.plan import StepWork, plan_decode
from magnets.decoding.policies import policy_label, policy_slug, route_settings
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError
from magnets.evaluation import DecodeConditions, decode_conditions, generate_samples
from magnets.files import atomic_write
from magnets.lit.maskgit import load_maskgit
from magnets.lit.tokenizer import load_tokenizer
from magnets.media import save_media
from magnets.models.tokenizer import Tokenizer
from magnets.provenance import check_tokenizer_identity
from magnets.runs import check_tokenizer_fits_model, resolve_checkpoint, shard_dir, tokenizer_of_run

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``samples_per_class`` samples of every class; write the grid and tokens; return a summary."""
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, task, run_config, provenance = load_maskgit(checkpoint, device)
    model = model.to(DECODE_DTYPES[cfg.dtype])
    model_cfg = model.cfg
    schedule = load_schedule(cast(dict[str, Any], OmegaConf.to_container(cfg.schedule, resolve=True)))
    check_schedule(cfg.schedule, model_cfg.widths)  # the checkpoint's widths: a single-width one takes no nested schedule
    width_per_step = schedule.width_per_step(model_cfg.widths)
    check_policy_fits(cfg.decode, model_cfg.widths, model_cfg.depth)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = cfg.tokenizer_checkpoint or tokenizer_of_run(run_config, checkpoint, cfg.paths.runs)
    tokenizer = cast(Tokenizer, load_tokenizer(tokenizer_path, device))
    check_tokenizer_fits_model(tokenizer.codebook_size, tokenizer.grid, Path(tokenizer_path), model_cfg, checkpoint)
    recorded = provenance.get("tokenizer_sha256")
    check_tokenizer_identity(recorded, Path(tokenizer_path), checkpoint, cfg.allow_tokenizer_mismatch)

    classes = list(range(model_cfg.num_classes)) if cfg.classes is None else list(cfg.classes)
    bad = [c for c in classes if not 0 <= c < model_cfg.num_classes]
    if bad:
        raise ConfigError("classes", bad, f"null (every class) or ids in 0..{model_cfg.num_classes - 1}")
    if task.given_tokens:  # frame prediction: the first clips of the condition split, in order
        shard = TokenDataset(shard_dir(run_config["tokenize"]["out_dir"], cfg.condition_split))
        conditions = decode_conditions(task, cfg.samples_per_class * len(classes), model_cfg.num_classes, device, shard)
    else:  # class-major: row c of the grid holds class c
        labels = torch.tensor(classes, device=device).repeat_interleave(cfg.samples_per_class)  # [C * S]
        conditions = DecodeConditions(labels)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = generate_samples(
        model, tokenizer, task, conditions, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every,
        cfg.batch_size, generator, compile=cfg.decode.compile, fast=cfg.decode.fast,
        refresh_layer=cfg.decode.refresh_layer, route=route_settings(cfg.decode),
    )  # fmt: skip
    image_batches: list[torch.Tensor] = []
    token_batches: list[torch.Tensor] = []
    work: list[StepWork] = []
    with torch.inference_mode(), tqdm(total=len(conditions), desc=f"{schedule.name}/{cfg.decode.cache}", unit="sample") as bar:
        for batch in batches:
            image_batches.append(batch.images)
            token_batches.append(batch.tokens)
            work.extend(batch.work)
            bar.update(len(batch.labels))
    images, tokens = torch.cat(image_batches), torch.cat(token_batches)  # [S, channels, ...], [S, N]
    labels = conditions.labels

    gflops = decode_flops_per_sample(model_cfg, work, len(labels)) / 1e9
    masked = model_cfg.num_tokens - task.given_tokens
    baseline_work = plan_decode(
        model_cfg.num_tokens, [1] * len(width_per_step), "none", guided=settings.guided, num_masked=masked
    ).work()
    baseline_gflops = decode_flops_per_sample(model_cfg, baseline_work, samples=1) / 1e9
    policy = policy_label(cfg.decode)
    folder = f"{schedule.name}_{cfg.decode.cache}{policy_slug(policy)}"
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.parent.parent / "samples" / folder
    media_files = save_media(images, out_dir / "grid", nrow=cfg.samples_per_class)
    if task.given_tokens:  # the real clips the predictions started from, through the same tokenizer
        assert conditions.real_tokens is not None  # frame prediction's conditions carry them
        with torch.inference_mode():
            real = tokenizer.decode(conditions.real_tokens.view(-1, *model_cfg.grid))
        media_files += save_media(real, out_dir / "real", nrow=cfg.samples_per_class)
    summary = {
        "checkpoint": str(checkpoint),
        "task": task.name,
        "schedule": schedule.name,
        "widths": list(schedule.widths),
        "steps": list(schedule.steps),
        "cache": cfg.decode.cache,
        "policy": policy,
        "samples": len(labels),
        "gflops_per_sample": gflops,
        "baseline_gflops_per_sample": baseline_gflops,
        "flops_ratio_vs_baseline": baseline_gflops / gflops,
        "decode": OmegaConf.to_container(cfg.decode, resolve=True),
    }
    atomic_write(
        out_dir / "samples.npz",
        lambda tmp: np.savez(tmp, tokens=tokens.cpu().numpy(), labels=labels.cpu().numpy(), summary=json.dumps(summary)),
    )
    print(
        f"{schedule.name} ({cfg.decode.cache}): {gflops:.3f} GFLOPs per sample, {baseline_gflops / gflops:.2f}x fewer than "
        f"the uncached full model with K={len(width_per_step)} ({baseline_gflops:.3f}); {len(labels)} samples in {out_dir}"
    )
    return {**summary, "out_dir": out_dir, "media_files": media_files, "tokens": tokens, "images": images}


@hydra.main(config_path="../../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(sample, cfg, check_sample_config)


if __name__ == "__main__":
    main()
