"""Benchmarks, measured side by side in one process; JSON out.

    python -m magnets.bench [bench=decode] [geometry=image] [model=s] [batch_size=8] [device=cpu]   (make bench)
    python -m magnets.bench geometry=video                                   (the paper's video token grid)
    python -m magnets.bench bench=train [geometry=image] [model=s] [batch_size=8]                   (make bench-train)

The ``geometry`` group sets the token grid, codebook size and classes the
models are built for: ``image`` (16x16 tokens, 1024 codes, 1000 classes) or
``video`` (the grid and codebook of the paper-scale causal 3D tokenizer,
``conf/tokenizer/causal3d_paper.yaml``, read through ``tokenizer_config``;
101 classes; frame prediction as ``conf/task/frame_pred.yaml``, 5
conditioning frames). ``grid=[...]``, ``codebook_size=`` and
``num_classes=`` override it.

``bench=decode``: class-conditional decoding of a batch from all-[MASK] with
every configured schedule x cache mode: ms per sample (median of repeats
after warm-up, configurations interleaved so that all see the same machine
state), samples/s, GFLOPs per sample, peak memory (CUDA), and speed-up and
FLOP ratio against the uncached baseline schedule; also the machine's dense
matmul GFLOP/s and the analytic GFLOPs of every shipped schedule x cache
mode at model ``flops_model`` (default b, whatever ``model`` is timed), for
each task of the geometry (class-conditional; for video also frame
prediction, whose given tokens are revealed from the first step).
``bench=train``: the time of one training step (masking, forward and
backward of every width, optimizer step) of the nested model with all
widths against the single-width model of the same size, alternating
repeats so both see the same machine state. Weights are random: speed does
not depend on them.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from magnets.choices import BENCHES, CACHE_MODES, DECODE_DTYPES, DECODE_PATHS, MODEL_SIZES
from magnets.cli import (
    check_choice,
    check_decode,
    check_device,
    check_model,
    check_policy_fits,
    check_positive_int,
    check_schedule,
    check_writable,
    run_entry,
)
from magnets.errors import ConfigError


def check_bench_config(cfg: DictConfig) -> None:
    """Everything ``python -m magnets.bench`` reads: the plain values first, then (importing torch) the geometry and the
    policy entries."""
    check_choice("bench", cfg.bench, BENCHES)
    check_choice("dtype", cfg.dtype, list(DECODE_DTYPES))
    check_model(cfg.model)
    check_choice("flops_model", cfg.flops_model, list(MODEL_SIZES))
    flops_dim = MODEL_SIZES[cfg.flops_model]["dim"]
    if any(flops_dim % p for p in cfg.model.widths):
        valid = f"divisors of the dim={flops_dim} of flops_model={cfg.flops_model!r} too"
        raise ConfigError("model.widths", list(cfg.model.widths), valid)
    check_device(cfg.device)
    check_decode(cfg.decode)
    for key in ("batch_size", "repeats"):
        check_positive_int(key, cfg[key])
    for name in [cfg.decode_bench.baseline, *cfg.decode_bench.schedules]:
        check_schedule(name, cfg.model.widths, key="decode_bench.schedules")
    for cache in cfg.decode_bench.caches:
        check_choice("decode_bench.caches", cache, CACHE_MODES)
    for path in cfg.decode_bench.paths:
        check_choice("decode_bench.paths", path, DECODE_PATHS)
    check_choice("train_bench.compile", cfg.train_bench.compile, [True, False])
    check_writable("out", cfg.out)

    from magnets.benchmarks import TRAIN_PRECISIONS, bench_geometry, bench_policy_label, policy_entry_decode  # torch

    bench_geometry(cfg)
    check_choice("train_bench.precision", cfg.train_bench.precision, list(TRAIN_PRECISIONS))
    seen: dict[tuple[str, str, str], int] = {}
    for index, entry in enumerate(cfg.decode_bench.policies):
        key = f"decode_bench.policies[{index}]"
        if "schedule" not in entry:
            raise ConfigError(f"{key}.schedule", None, "a schedule name for the policy, e.g. maskgit_4")
        check_schedule(entry.schedule, cfg.model.widths, key=f"{key}.schedule")
        unknown = sorted(set(entry) - {"schedule"} - set(cfg.decode))
        if unknown:
            raise ConfigError(f"{key}", unknown, f"keys of the decode group: {sorted(cfg.decode)}")
        decode_cfg = policy_entry_decode(cfg.decode, entry)
        check_decode(decode_cfg, key=key)
        check_policy_fits(decode_cfg, cfg.model.widths, int(cfg.model.depth), key=key)
        label = bench_policy_label(decode_cfg)
        if not label and float(cfg.decode.guidance_scale) == 0:
            raise ConfigError(key, dict(entry), "an entry that sets a policy or guidance (a plain schedule goes in schedules)")
        configuration = (entry.schedule, decode_cfg.cache, label)
        if configuration in seen:
            raise ConfigError(key, dict(entry), f"an entry other than decode_bench.policies[{seen[configuration]}]")
        seen[configuration] = index


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    """The configured benchmark, written to ``cfg.out`` and printed as a table (:mod:`magnets.benchmarks`, imported here:
    torch loads only once the config passed its check)."""
    from magnets.benchmarks import bench_decode, bench_train, print_decode, print_train, write_json

    result = bench_decode(cfg) if cfg.bench == "decode" else bench_train(cfg)
    path = write_json(result, cfg.out)
    (print_decode if cfg.bench == "decode" else print_train)(result, path)
    return result


@hydra.main(config_path="../../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(run_bench, cfg, check_bench_config)


if __name__ == "__main__":
    main()
