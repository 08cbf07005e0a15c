"""Decode a grid of class-conditional samples from a trained checkpoint with a model schedule.

    python -m magnets.sample [name=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
    make sample EXP=fmnist ARGS="schedule=maskgit_12 decode.cache=none"

Writes ``grid.png`` (one row per class) and ``samples.npz`` (tokens, labels,
schedule, cache, GFLOPs per sample) to ``out_dir`` (default: the checkpoint's
run directory, ``samples/<schedule>_<cache>/``) and prints the GFLOPs per
sample against the uncached full-model baseline with the same number of steps.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from magnets.evaluation import generate_images
from magnets.flops import decode_flops_per_sample, planned_decode_work
from magnets.lit.maskgit import load_maskgit
from magnets.lit.tokenizer import load_tokenizer
from magnets.sampling import SamplingSettings, load_schedule
from magnets.train import newest_checkpoint

log = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str, runs: str | Path, name: str) -> Path:
    """``last``: the newest ``<runs>/<name>/*/checkpoints/last.ckpt``; anything else is a path."""
    if checkpoint == "last":
        newest = newest_checkpoint(Path(runs, name), "*/checkpoints")
        if newest is None:
            raise FileNotFoundError(
                f"checkpoint=last: no {Path(runs, name)}/*/checkpoints/last.ckpt; train first (make train EXP={name})"
            )
        return newest
    return Path(checkpoint)


def tokenizer_checkpoint(run_config: dict[str, Any], checkpoint: Path, runs: str | Path) -> Path:
    """The tokenizer a MaskGIT run trained on, from the config saved in its checkpoint.

    A relative path under the run's ``paths.runs`` is taken under ``runs``
    instead, so that a runs folder can be moved or read from another directory.
    """
    try:
        explicit = run_config["tokenize"]["checkpoint"]
        path = Path(explicit) if explicit else Path(run_config["tokenizer"]["dir"], "tokenizer.ckpt")
        saved_runs = Path(run_config["paths"]["runs"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{checkpoint} holds no run config naming its tokenizer (tokenize.checkpoint, tokenizer.dir)") from err
    if not path.is_absolute() and path.is_relative_to(saved_runs):
        return Path(runs, path.relative_to(saved_runs))
    return path


def save_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)``, then rename to ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``samples_per_class`` samples of every class; write the grid and tokens; return a summary."""
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, run_config = load_maskgit(checkpoint, device)
    model_cfg = model.cfg
    schedule = load_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
    width_per_step = schedule.width_per_step(model_cfg.widths)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = cfg.tokenizer_checkpoint or tokenizer_checkpoint(run_config, checkpoint, cfg.paths.runs)
    tokenizer = load_tokenizer(tokenizer_path, device)

    classes = list(range(model_cfg.num_classes)) if cfg.classes is None else list(cfg.classes)
    bad = [c for c in classes if not 0 <= c < model_cfg.num_classes]
    if bad:
        raise ValueError(f"classes {bad} do not exist; the model has classes 0..{model_cfg.num_classes - 1}")
    labels = torch.tensor(classes, device=device).repeat_interleave(cfg.samples_per_class)  # [C * S]: class-major
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = generate_images(
        model, tokenizer, labels, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every, cfg.batch_size, generator
    )
    images, tokens, work = [], [], []
    with torch.inference_mode(), tqdm(total=len(labels), desc=f"{schedule.name}/{cfg.decode.cache}", unit="sample") as bar:
        for batch in batches:
            images.append(batch.images)
            tokens.append(batch.tokens)
            work.extend(batch.work)
            bar.update(len(batch.labels))
    images, tokens = torch.cat(images), torch.cat(tokens)  # [C * S, 1, H, W], [C * S, N]

    gflops = decode_flops_per_sample(model_cfg, work, len(labels)) / 1e9
    baseline_work = planned_decode_work(model_cfg, [1] * len(width_per_step), "none", guided=settings.guided)
    baseline_gflops = decode_flops_per_sample(model_cfg, baseline_work, samples=1) / 1e9
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.parent.parent / "samples" / f"{schedule.name}_{cfg.decode.cache}"
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(images, nrow=cfg.samples_per_class, pad_value=0.5)  # [C, rows*(H+2), S*(W+2)]
    save_atomically(out_dir / "grid.png", lambda tmp: torchvision.utils.save_image(grid, tmp, format="png"))
    summary = {
        "checkpoint": str(checkpoint),
        "schedule": schedule.name,
        "widths": list(schedule.widths),
        "steps": list(schedule.steps),
        "cache": cfg.decode.cache,
        "samples": len(labels),
        "gflops_per_sample": gflops,
        "baseline_gflops_per_sample": baseline_gflops,
        "flops_ratio_vs_baseline": baseline_gflops / gflops,
        "decode": OmegaConf.to_container(cfg.decode, resolve=True),
    }
    save_atomically(
        out_dir / "samples.npz",
        lambda tmp: np.savez(tmp, tokens=tokens.cpu().numpy(), labels=labels.cpu().numpy(), summary=json.dumps(summary)),
    )
    print(
        f"{schedule.name} ({cfg.decode.cache}): {gflops:.3f} GFLOPs per sample, {baseline_gflops / gflops:.2f}x fewer than "
        f"the uncached full model with K={len(width_per_step)} ({baseline_gflops:.3f}); {len(labels)} samples in {out_dir}"
    )
    return {**summary, "out_dir": out_dir, "tokens": tokens, "images": images}


@hydra.main(config_path="../../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
