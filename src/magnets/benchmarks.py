"""The benchmarks of ``python -m magnets.bench`` (the command, its settings and what it measures: :mod:`magnets.bench`):
decode and training-step timings measured side by side in one process, GFLOP tables, JSON out."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from magnets.choices import CACHE_MODES, MODEL_SIZES, model_dimensions
from magnets.cli import (
    check_choice,
    check_positive_int,
)
from magnets.decoding.flops import decode_flops_per_sample, nested_training_flop_ratio
from magnets.decoding.loop import DECODE_DTYPES, SamplingSettings, decode
from magnets.decoding.plan import plan_decode
from magnets.decoding.policies import PolicyLogits, build_decode_callables, policy_label, route_settings
from magnets.decoding.schedules import load_schedule, shipped_schedules
from magnets.errors import ConfigError
from magnets.files import atomic_write_json
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import random_training_mask
from magnets.models.tokenizer import num_tokens, tokenizer_config
from magnets.models.transformer import NestedTransformer, TransformerConfig

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "conf" / "tokenizer"  # the Hydra group `tokenizer`


@dataclass(frozen=True)
class BenchGeometry:
    """What the benchmarked models are built for, resolved from the ``geometry`` group and its overrides.

    ``frame_pred_given_tokens`` is the number of leading tokens frame
    prediction gives (the first latent frames of the flat ``(t, h, w)`` grid),
    ``None`` where the geometry has no frame prediction.
    """

    name: str
    grid: tuple[int, ...]
    codebook_size: int
    num_classes: int
    tokenizer: str | None
    cond_frames: int | None
    frame_pred_given_tokens: int | None

    def task_given_tokens(self) -> dict[str, int]:
        """Decode tasks of the FLOP table -> leading tokens each gives."""
        tasks = {"class_cond": 0}
        if self.frame_pred_given_tokens is not None:
            tasks["frame_pred"] = self.frame_pred_given_tokens
        return tasks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_settings(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The bench config and what the numbers depend on: torch version, threads, device."""
    return {
        **cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: tuple[int, int, int], repeats: int = 10) -> float:
    """Dense matmul throughput of this machine: ``[m, k] @ [k, n]``, median of ``repeats``."""
    m, k, n = size
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times[2:]) / 1e9


def shipped_tokenizers() -> list[str]:
    """Names of the tokenizer configs in ``conf/tokenizer/``."""
    return sorted(path.stem for path in TOKENIZER_DIR.glob("*.yaml"))


def shipped_tokenizer_config(name: str) -> Any:
    """The config dataclass (``grid``, ``codebook_size``, ...) of ``conf/tokenizer/<name>.yaml``, without building the network."""
    check_choice("geometry.tokenizer", name, shipped_tokenizers())
    raw = OmegaConf.load(TOKENIZER_DIR / f"{name}.yaml")
    try:
        return tokenizer_config(raw.kind, cast(dict[str, Any], OmegaConf.to_container(raw.model, resolve=True)))
    except (ValueError, OmegaConfBaseException) as err:  # e.g. a model that interpolates the data config
        raise ConfigError("geometry.tokenizer", name, f"a tokenizer config whose model stands alone ({err})") from err


def check_grid(grid: Any) -> None:
    if not OmegaConf.is_list(grid) or not grid or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ConfigError("grid", grid, "a token grid as a list of positive sides, e.g. [16,16] or [5,16,16]")


def bench_geometry(cfg: DictConfig) -> BenchGeometry:
    """The grid, codebook and classes of ``cfg``: ``grid``/``codebook_size`` when set, else the geometry's tokenizer's.

    Frame prediction (``geometry.frame_pred``, a ``task`` config) gives the
    latent frames that the tokenizer's own rule (``latent_frames_of``)
    assigns to its ``cond_frames`` conditioning frames, on the grid in use.
    """
    geometry = cfg.geometry
    tokenizer = None if geometry.tokenizer is None else shipped_tokenizer_config(geometry.tokenizer)
    if cfg.grid is not None:
        check_grid(cfg.grid)
        grid = tuple(cfg.grid)
    elif tokenizer is not None:
        grid = tuple(tokenizer.grid)
    else:
        raise ConfigError("grid", None, "a token grid, e.g. [16,16], where geometry.tokenizer names no tokenizer config")
    codebook_size = cfg.codebook_size if cfg.codebook_size is not None else getattr(tokenizer, "codebook_size", None)
    check_positive_int("codebook_size", codebook_size)
    assert codebook_size is not None  # checked positive above
    check_positive_int("num_classes", cfg.num_classes)
    given = None
    frame_pred, cond_frames = geometry.frame_pred, None
    if frame_pred is not None:
        check_choice("geometry.frame_pred.name", frame_pred.name, ["frame_pred"])
        cond_frames = frame_pred.cond_frames
        if tokenizer is None or not hasattr(tokenizer, "latent_frames_of"):
            raise ConfigError("geometry.frame_pred", "frame_pred", "null: frame prediction needs a video tokenizer")
        try:
            latent_frames = tokenizer.latent_frames_of(cond_frames)
        except ValueError as err:
            raise ConfigError("geometry.frame_pred.cond_frames", cond_frames, str(err)) from err
        if len(grid) != 3 or latent_frames >= grid[0]:
            valid = f"a [t, h, w] grid with more than the {latent_frames} latent frames frame prediction gives"
            raise ConfigError("grid", list(grid), valid)
        given = latent_frames * num_tokens(grid[1:])
    return BenchGeometry(geometry.name, grid, codebook_size, cfg.num_classes, geometry.tokenizer, cond_frames, given)


def bench_model_config(dimensions: Mapping[str, int], geometry: BenchGeometry, widths: list[int]) -> TransformerConfig:
    """A model of ``dimensions`` (:func:`magnets.models.transformer.model_dimensions` of a model config, or
    ``MODEL_SIZES[name]``) with the geometry's token grid, codebook and classes."""
    return TransformerConfig(
        **dimensions, codebook_size=geometry.codebook_size, grid=list(geometry.grid), num_classes=geometry.num_classes,
        widths=widths,
    )  # fmt: skip


def flops_table(
    model_cfg: TransformerConfig,
    settings: SamplingSettings,
    refresh_every: int,
    baseline: str,
    task_given_tokens: Mapping[str, int],
) -> list[dict]:
    """Analytic GFLOPs per sample of each task x shipped schedule x cache mode, and the ratio to the task's uncached ``baseline``.

    ``task_given_tokens`` maps each task to the leading tokens it gives:
    those are revealed from the first step, so only the others are decoded.
    """

    def gflops(schedule_name: str, cache: str, given: int) -> float:
        width_per_step = load_schedule(schedule_name).width_per_step(model_cfg.widths)
        plan = plan_decode(
            model_cfg.num_tokens, width_per_step, cache, refresh_every, settings.mask_schedule, settings.guided,
            num_masked=model_cfg.num_tokens - given,
        )  # fmt: skip
        work = plan.work()
        return decode_flops_per_sample(model_cfg, work, samples=1) / 1e9

    rows = []
    for task, given in task_given_tokens.items():
        base = gflops(baseline, "none", given)
        for name in shipped_schedules():
            for cache in CACHE_MODES:
                value = gflops(name, cache, given)
                rows.append(
                    {
                        "task": task,
                        "given_tokens": given,
                        "schedule": name,
                        "cache": cache,
                        "gflops_per_sample": value,
                        "flops_ratio_vs_baseline": base / value,
                    }
                )
    return rows


def bench_decode(cfg: DictConfig) -> dict[str, Any]:
    """Every ``decode_bench.paths`` x ``schedules`` x ``caches`` against the eager uncached baseline; the JSON record."""
    device, dtype = torch.device(cfg.device), DECODE_DTYPES[cfg.dtype] if cfg.dtype in DECODE_DTYPES else None
    if dtype is None:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; valid: {list(DECODE_DTYPES)}")
    bench = cfg.decode_bench
    geometry = bench_geometry(cfg)
    model_cfg = bench_model_config(model_dimensions(cfg.model), geometry, list(cfg.model.widths))
    flops_model_cfg = bench_model_config(MODEL_SIZES[cfg.flops_model], geometry, list(cfg.model.widths))
    settings = SamplingSettings.from_config(cfg.decode)
    torch.manual_seed(0)
    model = NestedTransformer(model_cfg).to(device=device, dtype=dtype).eval()
    baseline = (bench.baseline, "none", "eager", "")
    configurations = [baseline] + [
        (s, c, path, "") for path in bench.paths for s in bench.schedules for c in bench.caches
        if (s, c, path, "") != baseline
    ]  # fmt: skip
    # Each decode policy (decode_bench.policies: decode-group overrides with a schedule) is one more configuration.
    policy_decode: dict[str, DictConfig] = {"": cfg.decode}
    for entry in bench.policies:
        decode_cfg = policy_entry_decode(cfg.decode, entry)
        label = bench_policy_label(decode_cfg)
        policy_decode[label] = decode_cfg
        configurations.append((entry.schedule, decode_cfg.cache, "eager", label))
    width_per_step = {key[0]: load_schedule(key[0]).width_per_step(model_cfg.widths) for key in configurations}
    labels = torch.arange(cfg.batch_size, device=device) % model_cfg.num_classes
    initial = torch.full((cfg.batch_size, model_cfg.num_tokens), model_cfg.mask_id, device=device)

    def run(schedule: str, cache: str, path: str, policy: str) -> tuple[float, list]:
        decode_cfg = policy_decode[policy]
        policy_settings = SamplingSettings.from_config(decode_cfg)
        tokens_to_logits, unconditional_logits = build_decode_callables(
            model, policy_settings, cache, decode_cfg.refresh_every, refresh_layer=decode_cfg.refresh_layer,
            route=route_settings(decode_cfg), compile=decode_cfg.compile, fast=path == "fast",
            width_per_step=width_per_step[schedule],
        )  # fmt: skip
        generator = torch.Generator(device).manual_seed(0)
        synchronize(device)
        start = time.perf_counter()
        result = decode(
            tokens_to_logits, initial, labels, width_per_step[schedule], policy_settings,
            mask_id=model_cfg.mask_id, null_class=model_cfg.null_class, generator=generator,
            unconditional_logits=unconditional_logits,
            revealable=tokens_to_logits.revealable if isinstance(tokens_to_logits, PolicyLogits) else None,
        )  # fmt: skip
        synchronize(device)
        return time.perf_counter() - start, result.work

    times: dict[tuple[str, str, str, str], list[float]] = {key: [] for key in configurations}
    peak_mb: dict[tuple[str, str, str, str], float | None] = {key: None for key in configurations}
    work: dict[tuple[str, str, str, str], list] = {}
    with torch.inference_mode():
        for repeat in range(cfg.warmup + cfg.repeats):
            for key in configurations:  # interleaved: every configuration sees the same machine state
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, work[key] = run(*key)
                if device.type == "cuda":
                    peak_mb[key] = max(peak_mb[key] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
                if repeat >= cfg.warmup:
                    times[key].append(seconds)
                log.info("repeat %d %s/%s/%s %s: %.3f s", repeat, *key, seconds)

    gflops = {key: decode_flops_per_sample(model_cfg, work[key], cfg.batch_size) / 1e9 for key in configurations}
    median_s = {key: statistics.median(times[key]) for key in configurations}
    records = []
    for key in configurations:
        schedule, cache, path, policy = key
        speedup, flops_ratio = median_s[baseline] / median_s[key], gflops[baseline] / gflops[key]
        records.append(
            {
                "schedule": schedule,
                "cache": cache,
                "path": path,
                "policy": policy,
                "gflops_per_sample": gflops[key],
                "ms_per_sample": 1000 * median_s[key] / cfg.batch_size,
                "samples_per_s": cfg.batch_size / median_s[key],
                "achieved_gflops_per_s": gflops[key] * cfg.batch_size / median_s[key],
                "speedup_vs_baseline": speedup,
                "flops_ratio_vs_baseline": flops_ratio,
                "speedup_over_flops_ratio": speedup / flops_ratio,
                "peak_memory_mb": peak_mb[key],
                "times_s": times[key],
            }
        )
    matmul_size = (cfg.batch_size * model_cfg.num_tokens, model_cfg.dim, model_cfg.mlp_dim)
    return {
        "bench": "decode",
        "settings": {
            **run_settings(cfg, device),
            "peak_memory": "torch.cuda.max_memory_allocated per configuration; not measured on CPU",
        },
        "matmul_gflops_per_s": matmul_gflops(device, dtype, matmul_size),
        "matmul_shape": list(matmul_size),
        "records": records,
        "geometry": asdict(geometry),
        "flops_model": cfg.flops_model,
        "flops_table": flops_table(
            flops_model_cfg, settings, cfg.decode.refresh_every, bench.baseline, geometry.task_given_tokens()
        ),
    }


TRAIN_PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16}  # Lightning's names -> the autocast dtype


def train_step_seconds(
    module: NestedMaskGITModule,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Wall time of one full training step; the forward under autocast to ``autocast_dtype`` if given (bf16-mixed)."""
    start = time.perf_counter()
    batch, length = tokens.shape
    mask = random_training_mask(batch, length, device=tokens.device)
    inputs = tokens.masked_fill(mask, module.model.cfg.mask_id)
    with torch.autocast(tokens.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        losses = module.width_losses(inputs, tokens, mask, labels, alpha)
    total = torch.stack([loss for loss, _ in losses.values()]).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_train(cfg: DictConfig) -> dict[str, Any]:
    """Nested (all widths) vs single-width training step time under ``train_bench`` precision; the JSON record."""
    device = torch.device(cfg.device)
    geometry = bench_geometry(cfg)
    torch.manual_seed(0)
    base = {
        **model_dimensions(cfg.model),
        "codebook_size": geometry.codebook_size,
        "grid": list(geometry.grid),
        "num_classes": geometry.num_classes,
    }
    variants = {"nested": list(cfg.model.widths), "single": [1]}
    modules = {
        name: NestedMaskGITModule(model={**base, "widths": widths}, distill="progressive", compile=cfg.train_bench.compile).to(
            device
        )
        for name, widths in variants.items()
    }
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=1e-4) for name, module in modules.items()}
    tokens_per_item = num_tokens(geometry.grid)
    tokens = torch.randint(0, geometry.codebook_size, (cfg.batch_size, tokens_per_item), device=device)
    labels = torch.randint(0, geometry.num_classes, (cfg.batch_size,), device=device)
    autocast_dtype = TRAIN_PRECISIONS[cfg.train_bench.precision]
    times: dict[str, list[float]] = {name: [] for name in modules}
    for repeat in range(cfg.warmup + cfg.repeats):
        for name, module in modules.items():  # alternate: both see the same machine state
            seconds = train_step_seconds(module, optimizers[name], tokens, labels, 0.5, autocast_dtype)
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
                "tokens_per_s": cfg.batch_size * tokens_per_item / median,
                "flops_ratio_vs_single": nested_training_flop_ratio(module.model.cfg) if name == "nested" else 1.0,
            }
        )
    nested, single = records
    return {
        "bench": "train",
        "settings": run_settings(cfg, device),
        "geometry": asdict(geometry),
        "records": records,
        "time_ratio_nested_vs_single": nested["ms_per_step"] / single["ms_per_step"],
        "flops_ratio_nested_vs_single": nested["flops_ratio_vs_single"],
        "weight_flops_ratio_nominal": sum(1 / p for p in variants["nested"]),
    }


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` atomically (temp file, then rename)."""
    return atomic_write_json(path, result)


def print_decode(result: dict[str, Any], path: Path) -> None:
    print(
        f"{'schedule':<16} {'cache':<18} {'path':<6} {'GFLOPs/sample':>13} {'ms/sample':>10} {'speedup':>8} "
        f"{'FLOP ratio':>10} {'ratio':>6} {'GFLOP/s':>8}  policy"
    )
    for r in result["records"]:
        print(
            f"{r['schedule']:<16} {r['cache']:<18} {r['path']:<6} {r['gflops_per_sample']:>13.1f} {r['ms_per_sample']:>10.1f} "
            f"{r['speedup_vs_baseline']:>8.2f} {r['flops_ratio_vs_baseline']:>10.2f} {r['speedup_over_flops_ratio']:>6.2f} "
            f"{r['achieved_gflops_per_s']:>8.1f}  {r['policy']}"
        )
    print(f"dense matmul {result['matmul_shape']}: {result['matmul_gflops_per_s']:.1f} GFLOP/s")
    grid, baseline = "x".join(map(str, result["geometry"]["grid"])), result["settings"]["decode_bench"]["baseline"]
    print(
        f"\nanalytic GFLOPs per sample at model {result['flops_model']}, {grid} tokens (ratio: to the task's uncached {baseline})"
    )
    print(f"{'schedule':<16} {'cache':<18} {'task':<11} {'given':>6} {'GFLOPs/sample':>13} {'ratio':>6}")
    for r in result["flops_table"]:
        print(
            f"{r['schedule']:<16} {r['cache']:<18} {r['task']:<11} {r['given_tokens']:>6} "
            f"{r['gflops_per_sample']:>13.1f} {r['flops_ratio_vs_baseline']:>6.2f}"
        )
    print(f"written to {path}")


def print_train(result: dict[str, Any], path: Path) -> None:
    for record in result["records"]:
        ms, rate = record["ms_per_step"], record["tokens_per_s"]
        print(f"{record['model']:>7} widths={record['widths']}: {ms:.1f} ms/step, {rate:.0f} tokens/s")
    print(
        f"time ratio nested/single {result['time_ratio_nested_vs_single']:.2f}; "
        f"FLOP ratio {result['flops_ratio_nested_vs_single']:.3f} (weights only: {result['weight_flops_ratio_nominal']:.3f}); "
        f"written to {path}"
    )


def policy_entry_decode(decode: DictConfig, entry: Mapping[str, Any]) -> DictConfig:
    """The decode group of one ``decode_bench.policies`` entry: ``decode`` with the entry's overrides."""
    return cast(DictConfig, OmegaConf.merge(decode, {k: v for k, v in entry.items() if k != "schedule"}))


def bench_policy_label(decode_cfg: Mapping[str, Any]) -> str:
    """A policy entry's name in the records: its :func:`policy_label`, then ``w=<guidance>`` when it guides (plain
    guidance has no policy label, and must not take the plain decode's place)."""
    guidance = float(decode_cfg["guidance_scale"])
    return ",".join(part for part in (policy_label(decode_cfg), f"w={guidance:g}" if guidance > 0 else "") if part)
