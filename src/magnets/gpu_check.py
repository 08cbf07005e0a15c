"""The GPU check: what a machine with a GPU measures, in one command, one JSON and one short table.

    make gpu-check                         (PYTHONPATH=src python3 -m magnets.gpu_check; the machine's own torch)
    python -m magnets.gpu_check run_tests=false batch_sizes=[64]

In order: the CUDA tests (``pytest -m gpu tests/test_cuda.py``); the decode
benchmark at model ``b`` in bf16 for each of ``batch_sizes`` at the image
geometry and ``video_batch_size`` at the video one, the eager and the fast
(``decode.fast``: planned, CUDA graphs) paths side by side; one uncached
forward of every width, eager and replayed from a CUDA graph; the nested
against the single-width training step under bf16 autocast, with and without
``maskgit.module.compile``. Each target of ``conf/gpu_check.yaml`` is marked
met or not from the figures of the path that did best. Every part runs with
the project's sources under the machine's torch (>= 2.11), outside the venv.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from magnets.bench import check_bench_config
from magnets.benchmarks import (
    bench_decode,
    bench_geometry,
    bench_model_config,
    bench_train,
    run_settings,
    synchronize,
)  # fmt: skip
from magnets.choices import MODEL_SIZES
from magnets.cli import check_choice, check_device, check_positive_int, run_entry
from magnets.decoding.flops import forward_flops
from magnets.decoding.graphs import CapturedStep
from magnets.decoding.loop import DECODE_DTYPES
from magnets.errors import ConfigError
from magnets.files import atomic_write_json, atomic_write_text
from magnets.models.transformer import NestedTransformer

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def bench_config(overrides: list[str]) -> DictConfig:
    """The ``bench`` config with ``overrides``, composed as ``python -m magnets.bench`` would."""
    if GlobalHydra.instance().is_initialized():  # inside this entry point's @hydra.main: the same config folder
        cfg = compose("bench", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("bench", overrides=overrides)
    check_bench_config(cfg)
    return cfg


def run_cuda_tests() -> dict[str, Any]:
    """``pytest -m gpu tests/test_cuda.py`` in a child process: its exit status and closing line."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "seconds": time.perf_counter() - start}


def decode_records(cfg: DictConfig, geometry: str, batch_size: int) -> dict[str, Any]:
    """The decode benchmark at one geometry and batch, eager and fast paths side by side."""
    overrides = [
        f"geometry={geometry}", f"model={cfg.model_size}", f"device={cfg.device}", f"dtype={cfg.dtype}",
        f"batch_size={batch_size}", f"warmup={cfg.warmup}", f"repeats={cfg.repeats}",
        f"decode_bench.schedules=[{','.join(cfg.schedules)}]", f"decode_bench.caches=[{','.join(cfg.caches)}]",
        "decode_bench.paths=[eager,fast]", *(cfg.video_overrides if geometry == "video" else cfg.bench_overrides),
    ]  # fmt: skip
    result = bench_decode(bench_config(overrides))
    return {
        "geometry": geometry,
        "batch_size": batch_size,
        "records": result["records"],
        "matmul_gflops_per_s": result["matmul_gflops_per_s"],
    }


def median_seconds(run: Callable[..., Any], device: torch.device, warmup: int, repeats: int) -> float:
    times = []
    for repeat in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if repeat >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def width_forwards(cfg: DictConfig) -> list[dict[str, Any]]:
    """One uncached forward (every token, head at every position) of each width: eager, and replayed from a CUDA graph."""
    device, dtype = torch.device(cfg.device), DECODE_DTYPES[cfg.dtype]
    image = bench_geometry(bench_config([f"model={cfg.model_size}", *cfg.bench_overrides]))
    model_cfg = bench_model_config(MODEL_SIZES[cfg.model_size], image, [8, 4, 2, 1])
    torch.manual_seed(0)
    model = NestedTransformer(model_cfg).to(device=device, dtype=dtype).eval()
    batch = cfg.forward_batch_size
    tokens = torch.randint(0, model_cfg.codebook_size, (batch, model_cfg.num_tokens), device=device)
    labels = torch.arange(batch, device=device) % model_cfg.num_classes
    rows = []
    with torch.inference_mode():
        for width in (1, 2, 4, 8):
            seconds = median_seconds(lambda w=width: model(tokens, labels, width=w), device, cfg.warmup, cfg.repeats)
            graph_seconds = None
            if device.type == "cuda":
                captured = CapturedStep(lambda t, lab, w=width: model(t, lab, width=w), (tokens, labels), None)
                graph_seconds = median_seconds(lambda c=captured: c(tokens, labels), device, cfg.warmup, cfg.repeats)
            flops = forward_flops(model_cfg, width, model_cfg.num_tokens) * batch
            rows.append(
                {
                    "width": width,
                    "ms": 1000 * seconds,
                    "tflops_per_s": flops / seconds / 1e12,
                    "graph_ms": None if graph_seconds is None else 1000 * graph_seconds,
                    "gflops": flops / 1e9,
                }
            )
    m1 = rows[0]
    for row in rows:
        row["time_over_m1"] = row["ms"] / m1["ms"]
        row["flops_over_m1"] = row["gflops"] / m1["gflops"]
    return rows


def training(cfg: DictConfig) -> list[dict[str, Any]]:
    """Nested vs single-width training step under bf16 autocast, with and without ``maskgit.module.compile``."""
    results = []
    for compiled in cfg.train_compile:
        overrides = [
            "bench=train", f"model={cfg.model_size}", f"device={cfg.device}", f"batch_size={cfg.train_batch_size}",
            f"warmup={cfg.warmup}", f"repeats={cfg.repeats}", "train_bench.precision=bf16-mixed",
            f"train_bench.compile={str(compiled).lower()}", *cfg.bench_overrides,
        ]  # fmt: skip
        result = bench_train(bench_config(overrides))
        results.append(
            {
                "compile": compiled,
                "records": result["records"],
                "time_ratio": result["time_ratio_nested_vs_single"],
                "flops_ratio": result["flops_ratio_nested_vs_single"],
                "time_over_flop_ratio": result["time_ratio_nested_vs_single"] / result["flops_ratio_nested_vs_single"],
            }
        )
    return results


def best_record(decode: dict[str, Any], schedule: str, cache: str) -> dict[str, Any]:
    """The faster path's record of ``schedule`` x ``cache``."""
    candidates = [r for r in decode["records"] if r["schedule"] == schedule and r["cache"] == cache]
    return max(candidates, key=lambda r: r["speedup_vs_baseline"])


def target_rows(cfg: DictConfig, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of ``cfg.targets``: the measured value, the bound, met or not, and where the value came from."""
    targets, rows = cfg.targets, []

    def add(name: str, value: float | None, bound: float, at_most: bool, source: str) -> None:
        met = None if value is None else (value <= bound if at_most else value >= bound)
        rows.append({"target": name, "value": value, "bound": bound, "at_most": at_most, "met": met, "source": source})

    decodes = {(d["geometry"], d["batch_size"]): d for d in result["decode"]}
    for batch, key in ((64, "magnets_cached_b64_of_flop_ratio"), (256, "magnets_cached_b256_of_flop_ratio")):
        if ("image", batch) in decodes:
            best = best_record(decodes[("image", batch)], "magnets_3333", "refresh_on_switch")
            add(key, best["speedup_over_flops_ratio"], targets[key], False, f"image batch {batch}, {best['path']} path")
        else:
            add(key, None, targets[key], False, f"not measured (batch_sizes has no {batch})")
    if ("image", 64) in decodes:
        best = best_record(decodes[("image", 64)], "magnets_3333", "refresh_on_switch")
        baseline = best_record(decodes[("image", 64)], "maskgit_12", "none")
        add("magnets_cached_b64_speedup", best["speedup_vs_baseline"], targets.magnets_cached_b64_speedup, False,
            f"image batch 64, {best['path']} path")  # fmt: skip
        add("maskgit_uncached_b64_tflops", baseline["achieved_gflops_per_s"] / 1000, targets.maskgit_uncached_b64_tflops,
            False, f"{baseline['path']} path")  # fmt: skip
    else:
        for key in ("magnets_cached_b64_speedup", "maskgit_uncached_b64_tflops"):
            add(key, None, targets[key], False, "not measured (batch_sizes has no 64)")
    video = decodes[("video", cfg.video_batch_size)]
    best = best_record(video, "magnets_3333", "refresh_on_switch")
    add("video_b16_of_flop_ratio", best["speedup_over_flops_ratio"], targets.video_b16_of_flop_ratio, False,
        f"video batch {cfg.video_batch_size}, {best['path']} path")  # fmt: skip
    forwards = {row["width"]: row for row in result["width_forwards"]}
    m8_eager = forwards[8]["time_over_m1"]
    graph = forwards[8]["graph_ms"] / forwards[1]["graph_ms"] if forwards[8]["graph_ms"] else None
    value, source = (min(m8_eager, graph), "best of eager and graph") if graph is not None else (m8_eager, "eager")
    add("m8_over_m1_forward_time", value, targets.m8_over_m1_forward_time, True, source)
    best_train = min(result["training"], key=lambda r: r["time_over_flop_ratio"])
    add("nested_train_time_over_flop_ratio", best_train["time_over_flop_ratio"], targets.nested_train_time_over_flop_ratio,
        True, f"bf16-mixed, compile={best_train['compile']}")  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The short table: targets, then the decode records, per-width forwards and training steps."""
    lines = [f"# GPU check: {result['settings']['device_name']}, torch {result['settings']['torch']}", ""]
    tests = result.get("cuda_tests")
    if tests is not None:
        lines += [f"CUDA tests: `{tests['summary']}` (exit {tests['returncode']}, {tests['seconds']:.0f} s)", ""]
    lines += ["| target | value | bound | met | from |", "|---|---|---|---|---|"]
    for row in result["targets"]:
        value = "–" if row["value"] is None else f"{row['value']:.3f}"
        sign = "≤" if row["at_most"] else "≥"
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['target']} | {value} | {sign} {row['bound']} | {met} | {row['source']} |")
    lines += ["", "| geometry | batch | schedule | cache | path | ms/sample | speed-up | FLOP ratio | ratio | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for decode in result["decode"]:
        for r in decode["records"]:
            lines.append(
                f"| {decode['geometry']} | {decode['batch_size']} | {r['schedule']} | {r['cache']} | {r['path']} | "
                f"{r['ms_per_sample']:.3f} | {r['speedup_vs_baseline']:.2f} | {r['flops_ratio_vs_baseline']:.2f} | "
                f"{r['speedup_over_flops_ratio']:.2f} | {r['achieved_gflops_per_s'] / 1000:.1f} |"
            )
    lines += ["", "| width | ms | TFLOP/s | graph ms | time / m_1 | FLOPs / m_1 |", "|---|---|---|---|---|---|"]
    for row in result["width_forwards"]:
        graph = "–" if row["graph_ms"] is None else f"{row['graph_ms']:.2f}"
        lines.append(
            f"| m_{row['width']} | {row['ms']:.2f} | {row['tflops_per_s']:.1f} | {graph} | {row['time_over_m1']:.2f} | "
            f"{row['flops_over_m1']:.2f} |"
        )
    lines += ["", "| training (bf16-mixed) | nested ms | single ms | time ratio | FLOP ratio | time / FLOP ratio |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["training"]:
        nested, single = r["records"]
        lines.append(
            f"| compile={r['compile']} | {nested['ms_per_step']:.1f} | {single['ms_per_step']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['flops_ratio']:.2f} | {r['time_over_flop_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def gpu_check(cfg: DictConfig) -> dict[str, Any]:
    """Run every part, write ``gpu_check.json`` and ``gpu_check.md`` under ``cfg.out``; return the record."""
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    start = time.perf_counter()
    result: dict[str, Any] = {"settings": run_settings(cfg, device)}
    if cfg.run_tests:
        result["cuda_tests"] = run_cuda_tests()
        print(f"CUDA tests: {result['cuda_tests']['summary']}", flush=True)
    result["decode"] = [decode_records(cfg, "image", batch) for batch in cfg.batch_sizes]
    result["decode"].append(decode_records(cfg, "video", cfg.video_batch_size))
    result["width_forwards"] = width_forwards(cfg)
    result["training"] = training(cfg)
    result["targets"] = target_rows(cfg, result)
    result["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "gpu_check.json", result)
    table = markdown(result)
    atomic_write_text(out / "gpu_check.md", table)
    print(table + f"written to {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({result['seconds']:.0f} s)")
    return result


def check_gpu_check_config(cfg: DictConfig) -> None:
    check_device(cfg.device)
    check_choice("model_size", cfg.model_size, list(MODEL_SIZES))
    check_choice("dtype", cfg.dtype, list(DECODE_DTYPES))
    for key in ("video_batch_size", "forward_batch_size", "train_batch_size", "repeats"):
        check_positive_int(key, cfg[key])
    for batch in cfg.batch_sizes:
        check_positive_int("batch_sizes", batch)
    for compiled in cfg.train_compile:
        check_choice("train_compile", compiled, [True, False])
    for key in ("bench_overrides", "video_overrides"):
        if not OmegaConf.is_list(cfg[key]):
            raise ConfigError(key, cfg[key], "a list of bench overrides, e.g. ['grid=[4,4]']")
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("out", cfg.out, f"a folder that can be written ({err.strerror})") from err


@hydra.main(config_path="../../conf", config_name="gpu_check", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(gpu_check, cfg, check_gpu_check_config)


if __name__ == "__main__":
    main()
