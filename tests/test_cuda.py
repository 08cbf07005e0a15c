"""What can break on CUDA: cached decoding, bf16 training and decoding, the benchmark's peak memory, the pipeline.

Every test here is marked ``gpu`` and skipped without a CUDA device, so the
suite passes on a CPU-only machine; plain ``make test`` runs them on a GPU one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import test_decoding as decoding_tests
from conftest import CONF_DIR
from magnets.benchmarks import bench_decode, bench_train
from magnets.choices import MODEL_SIZES
from magnets.decoding.cache import build_tokens_to_logits
from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.schedules import ModelSchedule
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import random_training_mask
from magnets.models.transformer import NestedTransformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
WIDTHS = [8, 4, 2, 1]
GRID = 16  # tokens per sample (a 4x4 grid)
SCALE_UP = ModelSchedule("up", (8, 4, 2, 1), (2, 1, 2, 2)).width_per_step(WIDTHS)
MAGNETS_3333 = ModelSchedule("magnets", (8, 4, 2, 1), (3, 3, 3, 3)).width_per_step(WIDTHS)


def make_model(depth: int, dtype: torch.dtype = torch.float32, seed: int = 0, large: bool = True) -> NestedTransformer:
    """The CPU decode tests' small nested model, on CUDA."""
    return decoding_tests.make_model(depth, seed=seed, dtype=dtype, large=large, device=CUDA)


def run(model, width_per_step, cache, **options):
    """The CPU decode tests' decode (initial tokens, result, every step's logits), on CUDA."""
    return decoding_tests.run(model, width_per_step, cache, device=CUDA, **options)


@pytest.mark.parametrize("schedule", [SCALE_UP, [1] * 7])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("pre_reveal", [0, 5])
def test_refreshing_every_step_gives_exactly_the_uncached_tokens_on_cuda(schedule, guidance, pre_reveal):
    model = make_model(depth=2)
    _, uncached, _ = run(model, schedule, "none", guidance=guidance, pre_reveal=pre_reveal)
    _, cached, _ = run(model, schedule, "refresh_every_n", refresh_every=1, guidance=guidance, pre_reveal=pre_reveal)
    assert uncached.tokens.is_cuda
    assert torch.equal(cached.tokens, uncached.tokens)
    assert all(w.kind == "refresh" for w in cached.work)


@pytest.mark.parametrize(("mode", "schedule"), [("refresh_on_switch", SCALE_UP), ("no_refresh", [4] * 7)])
def test_depth_one_cached_steps_match_uncached_decoding_on_cuda(mode, schedule):
    """The cached path itself (cache writes, slices, attention over cache + queries) on CUDA, in float64."""
    model = make_model(depth=1, dtype=torch.float64)
    _, ref_result, ref_logits = run(model, schedule, "none", guidance=1.5, pre_reveal=6)
    _, result, logits = run(model, schedule, mode, guidance=1.5, pre_reveal=6)
    assert any(w.kind == "cached" for w in result.work)
    for step, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"step {step}: logits differ by {(a - b).abs().max():.3g}"
    assert torch.equal(ref_result.tokens, result.tokens)


@pytest.mark.parametrize("cache", ["none", "refresh_on_switch", "no_refresh"])
def test_bf16_decode_on_cuda_reveals_every_token_and_is_reproducible(cache):
    """bf16 and fp32 need not pick the same tokens (rounding moves near-ties); the invariants and the seed must hold."""
    model = make_model(depth=2, dtype=torch.bfloat16)
    initial, result, logits = run(model, MAGNETS_3333, cache, guidance=1.0, pre_reveal=3, keep_history=True)
    assert logits[0].dtype == torch.bfloat16 and bool(torch.isfinite(logits[0]).all())
    history = torch.cat([initial[None], result.history])  # [K + 1, B, N]
    masked = history == model.cfg.mask_id
    assert bool(((masked[:-1] & ~masked[1:]).sum(dim=2) >= 1).all()), "every step reveals at least one token"
    assert not bool(masked[-1].any()), "no token is left masked"
    assert bool(((result.tokens >= 0) & (result.tokens < model.cfg.codebook_size)).all())
    for k in range(len(MAGNETS_3333)):
        kept = ~masked[k]
        assert torch.equal(history[k + 1][kept], history[k][kept]), f"step {k} changed a revealed token"
    _, again, _ = run(model, MAGNETS_3333, cache, guidance=1.0, pre_reveal=3)
    assert torch.equal(again.tokens, result.tokens), "same seed, same device: same samples"


def test_bf16_logits_follow_fp32_logits_on_cuda():
    """The first (refresh) step's logits of the same weights in bf16 and fp32 agree up to bf16 rounding."""
    fp32, bf16 = make_model(depth=2, large=False), make_model(depth=2, dtype=torch.bfloat16, large=False)
    tokens = torch.randint(0, 12, (4, GRID), generator=torch.Generator().manual_seed(0)).to(CUDA)
    tokens[:, ::2] = fp32.cfg.mask_id
    labels = torch.tensor([0, 1, 2, 0], device=CUDA)
    for width in WIDTHS:
        with torch.inference_mode():
            a, _ = build_tokens_to_logits(fp32, "refresh_on_switch")(tokens, labels, width, 0)
            b, _ = build_tokens_to_logits(bf16, "refresh_on_switch")(tokens, labels, width, 0)
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0)
        assert cosine > 0.99, f"width {width}: cosine {cosine:.4f}"


def test_nested_training_step_under_bf16_autocast_is_finite_for_every_width():
    torch.manual_seed(0)
    module = NestedMaskGITModule(
        model={**MODEL_SIZES["tiny"], "codebook_size": 64, "grid": [8, 8], "num_classes": 10, "widths": WIDTHS}
    ).to(CUDA)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    generator = torch.Generator(CUDA).manual_seed(0)
    tokens = torch.randint(0, 64, (16, 64), device=CUDA, generator=generator)
    labels = torch.randint(0, 10, (16,), device=CUDA, generator=generator)
    first = None
    for _ in range(3):
        mask = random_training_mask(16, 64, generator=generator, device=CUDA)
        inputs = tokens.masked_fill(mask, module.model.cfg.mask_id)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = module.width_losses(inputs, tokens, mask, labels, alpha=0.5, label_smoothing=0.1)
        assert sorted(losses) == sorted(WIDTHS)
        for p, (loss, acc) in losses.items():
            assert loss.is_cuda and bool(torch.isfinite(loss)), f"width {p}: loss {loss}"
            assert 0.0 <= float(acc) <= 1.0
        total = sum(loss for loss, _ in losses.values())
        first = float(total) if first is None else first
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        for name, param in module.named_parameters():
            assert param.grad is None or bool(torch.isfinite(param.grad).all()), f"non-finite gradient in {name}"
        optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    assert math.isfinite(first)


def bench_config(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=overrides)


def test_bench_decode_on_cuda_in_bf16_reports_peak_memory():
    cfg = bench_config(["model=tiny", "batch_size=4", "grid=[4,4]", "warmup=0", "repeats=1", "device=cuda", "dtype=bfloat16"])
    result = bench_decode(cfg)
    assert result["settings"]["device_name"] == torch.cuda.get_device_name(0)
    records = {(r["schedule"], r["cache"]): r for r in result["records"]}
    assert set(records) == {(s, c) for s in cfg.decode_bench.schedules for c in cfg.decode_bench.caches}
    for r in result["records"]:
        assert r["peak_memory_mb"] is not None and r["peak_memory_mb"] > 0
        assert r["ms_per_sample"] > 0 and r["gflops_per_sample"] > 0
    assert result["matmul_gflops_per_s"] > 0


def test_bench_train_on_cuda():
    cfg = bench_config(["bench=train", "model=tiny", "batch_size=4", "grid=[4,4]", "warmup=1", "repeats=1", "device=cuda"])
    result = bench_train(cfg)
    assert [r["model"] for r in result["records"]] == ["nested", "single"]
    assert all(r["ms_per_step"] > 0 for r in result["records"])


def test_pipeline_trains_on_the_gpu_trainer_in_bf16_mixed(tiny_cfg):
    """The default experiment, shrunk, with ``trainer=gpu`` (bf16-mixed) and tokenization on CUDA."""
    from magnets.pipeline import train

    gpu = OmegaConf.load(CONF_DIR / "trainer" / "gpu.yaml")
    for key in ("accelerator", "devices", "num_nodes", "strategy", "precision"):
        tiny_cfg.trainer[key] = gpu[key]
    tiny_cfg.tokenize.device = "cuda"
    out = train(tiny_cfg)
    saved = torch.load(out["maskgit"]["checkpoint"], map_location="cpu", weights_only=False)
    assert saved["global_step"] == tiny_cfg.maskgit.trainer.max_steps
    metrics = out["maskgit"]["metrics"]
    for p in WIDTHS:
        assert math.isfinite(metrics[f"val/loss/p{p}"]), metrics


def test_compiled_cached_decode_on_cuda_in_bf16_reveals_every_token():
    model = make_model(depth=2, dtype=torch.bfloat16)
    tokens_to_logits = build_tokens_to_logits(model, "refresh_on_switch", compile=True)
    labels = torch.arange(3, device=CUDA) % model.cfg.num_classes
    initial = torch.full((3, GRID), model.cfg.mask_id, device=CUDA)
    with torch.inference_mode():
        result = decode(
            tokens_to_logits, initial, labels, SCALE_UP, SamplingSettings(), mask_id=model.cfg.mask_id,
            null_class=model.cfg.null_class, generator=torch.Generator(CUDA).manual_seed(1),
        )  # fmt: skip
    assert (result.tokens != model.cfg.mask_id).all() and (result.tokens < model.cfg.codebook_size).all()


def test_bench_decode_on_cuda_with_compile():
    overrides = ["model=tiny", "batch_size=4", "grid=[4,4]", "warmup=1", "repeats=1", "device=cuda", "dtype=bfloat16"]
    result = bench_decode(bench_config([*overrides, "decode.compile=true"]))
    assert result["settings"]["decode"]["compile"] is True
    assert all(r["ms_per_sample"] > 0 for r in result["records"])


@pytest.mark.parametrize("cache", ["none", "refresh_on_switch", "no_refresh", "refresh_every_n"])
@pytest.mark.parametrize(("guidance", "pre_reveal"), [(0.0, 0), (2.0, 5)])
def test_graph_captured_decode_reveals_exactly_the_eager_tokens_on_cuda(cache, guidance, pre_reveal):
    """decode.fast on CUDA: every step captured into a CUDA graph, then replayed by a second decode; same tokens."""
    model = make_model(depth=2)
    planned = build_tokens_to_logits(model, cache, fast=True, width_per_step=SCALE_UP)
    _, eager, eager_logits = run(model, SCALE_UP, cache, guidance=guidance, pre_reveal=pre_reveal)
    for attempt in ("captured", "replayed"):
        _, fast, fast_logits = run(model, SCALE_UP, cache, guidance=guidance, pre_reveal=pre_reveal, tokens_to_logits=planned)
        for step, (a, b) in enumerate(zip(eager_logits, fast_logits, strict=True)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{attempt}, step {step}")
        assert torch.equal(fast.tokens, eager.tokens), attempt
        assert fast.work == eager.work
    (state,) = planned.states.values()
    assert sorted(state.captured) == list(range(len(SCALE_UP))), "every step captured once"


def test_graph_captured_decode_in_bf16_with_static_compile_on_cuda():
    """decode.fast with decode.compile: static-shape compiled steps inside the captured graphs; reveal invariants hold."""
    model = make_model(depth=2, dtype=torch.bfloat16)
    planned = build_tokens_to_logits(model, "refresh_on_switch", compile=True, fast=True, width_per_step=MAGNETS_3333)
    first = run(model, MAGNETS_3333, "refresh_on_switch", guidance=1.0, tokens_to_logits=planned)[1]
    again = run(model, MAGNETS_3333, "refresh_on_switch", guidance=1.0, tokens_to_logits=planned)[1]
    assert torch.equal(first.tokens, again.tokens), "replayed graphs: same seed, same samples"
    assert (first.tokens != model.cfg.mask_id).all() and (first.tokens < model.cfg.codebook_size).all()


def test_bench_decode_on_cuda_times_the_fast_path():
    overrides = ["model=tiny", "batch_size=4", "grid=[4,4]", "warmup=1", "repeats=1", "device=cuda", "dtype=bfloat16"]
    result = bench_decode(bench_config([*overrides, "decode_bench.paths=[eager,fast]"]))
    paths = {r["path"] for r in result["records"]}
    assert paths == {"eager", "fast"} and all(r["ms_per_sample"] > 0 for r in result["records"])
