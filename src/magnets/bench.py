"""Benchmarks, measured side by side in one process; JSON out.

    python -m magnets.bench task=train [model=s] [batch_size=8] [grid=16]   (make bench-train)

``task=train``: the time of one training step (masking, forward and
backward of every width, optimizer step) of the nested model with all
widths against the single-width model of the same size, alternating
repeats so both see the same machine state. Weights are random: speed does
not depend on them.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from magnets.flops import nested_training_flop_ratio
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import random_training_mask
from magnets.models.transformer import MODEL_SIZES

log = logging.getLogger(__name__)

TASKS = ("train",)


def train_step_seconds(
    module: NestedMaskGITModule, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, labels: torch.Tensor, alpha: float
) -> float:
    """Wall time of one full training step."""
    start = time.perf_counter()
    mask = random_training_mask(*tokens.shape, device=tokens.device)
    inputs = tokens.masked_fill(mask, module.model.cfg.mask_id)
    losses = module.width_losses(inputs, tokens, mask, labels, alpha)
    total = sum(loss for loss, _ in losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_train(cfg: DictConfig) -> dict[str, Any]:
    """Nested (all widths) vs single-width training step time; returns the JSON record."""
    if cfg.model.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {cfg.model.size!r}; valid: {list(MODEL_SIZES)}")
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    base = {
        **MODEL_SIZES[cfg.model.size],
        "codebook_size": cfg.codebook_size,
        "num_tokens": cfg.grid**2,
        "num_classes": cfg.num_classes,
    }
    variants = {"nested": list(cfg.model.widths), "single": [1]}
    modules = {
        name: NestedMaskGITModule(model={**base, "widths": widths}, distill="progressive").to(device)
        for name, widths in variants.items()
    }
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=1e-4) for name, module in modules.items()}
    tokens = torch.randint(0, cfg.codebook_size, (cfg.batch_size, cfg.grid**2), device=device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for repeat in range(cfg.warmup + cfg.repeats):
        for name, module in modules.items():  # alternate: both see the same machine state
            seconds = train_step_seconds(module, optimizers[name], tokens, labels, alpha=0.5)
            if repeat >= cfg.warmup:
                times[name].append(seconds)
    records = []
    for name, module in modules.items():
        median = statistics.median(times[name])
        records.append(
            {
                "model": name,
                "widths": variants[name],
                "ms_per_step": 1000 * median,
                "tokens_per_s": cfg.batch_size * cfg.grid**2 / median,
                "flops_ratio_vs_single": nested_training_flop_ratio(module.model.cfg) if name == "nested" else 1.0,
            }
        )
    nested, single = records
    return {
        "task": "train",
        "settings": {
            **OmegaConf.to_container(cfg, resolve=True),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "records": records,
        "time_ratio_nested_vs_single": nested["ms_per_step"] / single["ms_per_step"],
        "flops_ratio_nested_vs_single": nested["flops_ratio_vs_single"],
        "weight_flops_ratio_nominal": sum(1 / p for p in variants["nested"]),
    }


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


@hydra.main(config_path="../../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown bench task {cfg.task!r}; valid: {list(TASKS)}")
    result = bench_train(cfg)
    path = write_json(result, cfg.out)
    for record in result["records"]:
        ms, rate = record["ms_per_step"], record["tokens_per_s"]
        print(f"{record['model']:>7} widths={record['widths']}: {ms:.1f} ms/step, {rate:.0f} tokens/s")
    print(
        f"time ratio nested/single {result['time_ratio_nested_vs_single']:.2f}; "
        f"FLOP ratio {result['flops_ratio_nested_vs_single']:.3f} (weights only: {result['weight_flops_ratio_nominal']:.3f}); "
        f"written to {path}"
    )


if __name__ == "__main__":
    main()
