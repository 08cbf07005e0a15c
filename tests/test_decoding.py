"""Parallel decoding: cache bookkeeping against uncached decoding, reveal invariants, schedules, FLOPs."""

from __future__ import annotations

import pytest
import torch

from conftest import flop_counter
from magnets.choices import CACHE_MODES
from magnets.decoding.cache import ascending_positions, build_tokens_to_logits
from magnets.decoding.flops import decode_flops_per_sample
from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.plan import plan_decode
from magnets.decoding.schedules import ModelSchedule
from magnets.masking import decode_masked_counts
from magnets.models.transformer import NestedTransformer, TransformerConfig

WIDTHS = [8, 4, 2, 1]
GRID = 16  # tokens per sample (a 4x4 grid)


def make_model(
    depth: int, seed: int = 0, dtype: torch.dtype = torch.float32, large: bool = True, device: str | torch.device = "cpu"
) -> NestedTransformer:
    """A small nested model; ``large``: random weights of std 0.5, so that every token's context moves the logits."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(codebook_size=12, grid=[GRID], num_classes=3, dim=32, depth=depth, heads=2, mlp_dim=64, widths=WIDTHS)
    model = NestedTransformer(cfg)
    if large:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.5)
    return model.to(device=device, dtype=dtype).eval()


class Recorder:
    """Wraps a tokens-to-logits callable and keeps every step's logits."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def __call__(self, tokens, labels, width, step):
        logits, work = self.inner(tokens, labels, width, step)
        self.logits.append(logits.detach().clone())
        return logits, work


def run(
    model,
    width_per_step,
    cache,
    *,
    guidance=0.0,
    pre_reveal=0,
    seed=1,
    refresh_every=2,
    batch=3,
    keep_history=False,
    device="cpu",
    fast=False,
    tokens_to_logits=None,
):
    """Decode ``batch`` samples on ``device``; ``pre_reveal`` tokens per row start revealed (frame-prediction style).

    ``fast``: through the planned path; ``tokens_to_logits``: through that callable (e.g. one reused across decodes).
    """
    cfg = model.cfg
    data = torch.Generator().manual_seed(123)
    tokens = torch.full((batch, GRID), cfg.mask_id)
    if pre_reveal:
        positions = torch.stack([torch.randperm(GRID, generator=data)[:pre_reveal] for _ in range(batch)])
        tokens.scatter_(1, positions, torch.randint(0, cfg.codebook_size, (batch, pre_reveal), generator=data))
    tokens = tokens.to(device)
    labels = (torch.arange(batch) % cfg.num_classes).to(device)
    if tokens_to_logits is None:
        tokens_to_logits = build_tokens_to_logits(model, cache, refresh_every, fast=fast, width_per_step=width_per_step)
    recorder = Recorder(tokens_to_logits)
    settings = SamplingSettings(guidance_scale=guidance, guidance_ramp="linear" if guidance else "constant")
    with torch.inference_mode():
        result = decode(
            recorder, tokens, labels, width_per_step, settings, mask_id=cfg.mask_id, null_class=cfg.null_class,
            generator=torch.Generator(device).manual_seed(seed), keep_history=keep_history,
        )  # fmt: skip
    return tokens, result, recorder.logits


SCALE_UP = ModelSchedule("up", (8, 4, 2, 1), (2, 1, 2, 2)).width_per_step(WIDTHS)
SCALE_DOWN = ModelSchedule("down", (1, 2, 8), (2, 3, 2)).width_per_step(WIDTHS)
ABRUPT = ModelSchedule("abrupt", (8, 1), (4, 3)).width_per_step(WIDTHS)


@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN, ABRUPT, [1] * 7])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("pre_reveal", [0, 5])
def test_refreshing_every_step_gives_exactly_the_uncached_tokens(schedule, guidance, pre_reveal):
    model = make_model(depth=2)
    _, uncached, _ = run(model, schedule, "none", guidance=guidance, pre_reveal=pre_reveal)
    _, cached, _ = run(model, schedule, "refresh_every_n", refresh_every=1, guidance=guidance, pre_reveal=pre_reveal)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert all(w.kind == "refresh" for w in cached.work)


def assert_same_decode(reference, candidate):
    (_, ref_result, ref_logits), (_, result, logits) = reference, candidate
    for step, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"step {step}: logits differ by {(a - b).abs().max():.3g}"
    assert torch.equal(ref_result.tokens, result.tokens)


CACHE_NEVER_STALE = [
    *[(mode, schedule) for mode in ("refresh_on_switch", "refresh_every_n") for schedule in (SCALE_UP, SCALE_DOWN, ABRUPT)],
    *[(mode, [p] * 7) for mode in ("refresh_on_switch", "no_refresh", "refresh_every_n") for p in (1, 4)],
]


@pytest.mark.parametrize(("mode", "schedule"), CACHE_NEVER_STALE)
@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("pre_reveal", [0, 6])
def test_depth_one_cache_matches_uncached_decoding(mode, schedule, guidance, pre_reveal):
    """One layer: a revealed token's keys/values depend only on its embedding and width, so the cache is never stale."""
    model = make_model(depth=1, dtype=torch.float64)
    reference = run(model, schedule, "none", guidance=guidance, pre_reveal=pre_reveal)
    candidate = run(model, schedule, mode, guidance=guidance, pre_reveal=pre_reveal)
    assert any(w.kind == "cached" for w in candidate[1].work)
    assert_same_decode(reference, candidate)


def test_cache_comparison_is_sensitive():
    """The comparison above can fail: stale entries (no refresh at a switch, or depth 2) change the logits."""
    shallow, deep = make_model(depth=1, dtype=torch.float64), make_model(depth=2, dtype=torch.float64)
    for model, schedule, mode in ((shallow, SCALE_UP, "no_refresh"), (deep, [1] * 7, "refresh_on_switch")):
        _, _, reference = run(model, schedule, "none")
        _, _, logits = run(model, schedule, mode)
        assert max((a - b).abs().max() for a, b in zip(reference, logits, strict=True)) > 1e-3


def test_uncached_logits_are_the_model_forward_at_masked_positions():
    model = make_model(depth=2)
    tokens = torch.randint(0, 12, (2, GRID))
    tokens[:, ::3] = model.cfg.mask_id
    labels = torch.tensor([0, 2])
    logits, work = build_tokens_to_logits(model, "none")(tokens, labels, 2, 0)
    expected = model(tokens, labels, width=2)[tokens == model.cfg.mask_id].view(2, -1, 12)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert (work.queries, work.head_positions) == (GRID, 6)


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_reveal_invariants(cache):
    model = make_model(depth=2)
    schedule = ModelSchedule("up", (8, 4, 2, 1), (3, 3, 3, 3)).width_per_step(WIDTHS)
    initial, result, _ = run(model, schedule, cache, pre_reveal=3, keep_history=True)
    history = torch.cat([initial[None], result.history])  # [K + 1, B, N]
    masked = history == model.cfg.mask_id
    newly_revealed = (masked[:-1] & ~masked[1:]).sum(dim=2)  # [K, B]
    assert bool((newly_revealed >= 1).all()), "every step reveals at least one token"
    assert not bool(masked[-1].any()), "no token is left masked"
    for k in range(len(schedule)):
        kept = ~masked[k]
        assert torch.equal(history[k + 1][kept], history[k][kept]), f"step {k} changed a revealed token"
    assert bool((result.tokens < model.cfg.codebook_size).all())
    assert result.revealed == newly_revealed[:, 0].tolist()
    assert result.widths == schedule


def test_same_seed_same_samples_other_seed_other_samples():
    model = make_model(depth=2)
    first, second, other = (run(model, SCALE_UP, "refresh_on_switch", seed=s)[1].tokens for s in (5, 5, 6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_schedule_errors_name_the_valid_values():
    with pytest.raises(ValueError, match=r"sum to 11, expected K=12"):
        ModelSchedule("bad", (8, 4, 2, 1), (3, 3, 3, 2)).width_per_step(WIDTHS, total_steps=12)
    with pytest.raises(ValueError, match=r"widths \[16\] .* configured widths: \[8, 4, 2, 1\]"):
        ModelSchedule("bad", (16, 1), (6, 6)).width_per_step(WIDTHS)
    with pytest.raises(ValueError, match="differ in length"):
        ModelSchedule("bad", (8, 1), (12,))
    with pytest.raises(ValueError, match="non-negative integers"):
        ModelSchedule("bad", (8, 1), (-1, 13))
    with pytest.raises(ValueError, match=r"unknown cache mode 'sometimes'; valid: \['none', 'refresh_on_switch'"):
        build_tokens_to_logits(make_model(depth=1), "sometimes")
    with pytest.raises(ValueError, match=r"guidance_ramp 'cosine'; valid: \['constant', 'linear'\]"):
        SamplingSettings(guidance_ramp="cosine")
    with pytest.raises(ValueError, match="use at most 4 steps"):
        decode_masked_counts(4, 12)


@pytest.mark.parametrize("schedule_name", ["cosine", "linear", "square_root", "arccos"])
def test_decode_masked_counts_reveal_at_least_one_per_step(schedule_name):
    for n, k in ((256, 12), (16, 16), (20, 7)):
        counts = decode_masked_counts(n, k, schedule_name)
        assert counts[-1] == 0 and len(counts) == k
        assert all(a > b for a, b in zip([n, *counts], counts, strict=False))


@pytest.mark.parametrize(
    ("cache", "guidance"), [("none", 0.0), ("refresh_on_switch", 0.0), ("no_refresh", 2.0), ("refresh_every_n", 2.0)]
)
@pytest.mark.parametrize("fast", [False, True])
def test_analytic_flops_match_the_flop_counter(cache, guidance, fast):
    """The formula against torch's counter on a real decode (the CPU attention kernel given torch's SDPA formula)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=64, grid=[64], num_classes=3, dim=64, depth=2, heads=4, mlp_dim=128, widths=WIDTHS)
    model = NestedTransformer(cfg).eval()
    schedule = ModelSchedule("up", (8, 4, 2, 1), (2, 2, 2, 2)).width_per_step(WIDTHS)
    tokens, labels = torch.full((2, 64), cfg.mask_id), torch.tensor([0, 1])
    settings = SamplingSettings(guidance_scale=guidance)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        result = decode(
            build_tokens_to_logits(model, cache, fast=fast, width_per_step=schedule), tokens, labels, schedule, settings,
            mask_id=cfg.mask_id, null_class=3,
        )  # fmt: skip
    counted = counter.get_total_flops() / 2
    analytic = decode_flops_per_sample(cfg, result.work, samples=2)
    assert analytic == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("cache", ["none", "refresh_on_switch"])  # torch.compile on the CPU: ~12 s each
def test_compiled_tokens_to_logits_decode_the_same_tokens(cache):
    model = make_model(depth=2)
    eager = Recorder(build_tokens_to_logits(model, cache))
    compiled = Recorder(build_tokens_to_logits(model, cache, compile=True))
    assert compiled.inner.hidden is not model.hidden
    tokens = torch.full((3, GRID), model.cfg.mask_id)
    labels = torch.arange(3) % model.cfg.num_classes
    results = []
    for recorder in (eager, compiled):
        with torch.inference_mode():
            results.append(
                decode(
                    recorder,
                    tokens,
                    labels,
                    SCALE_UP,
                    SamplingSettings(),
                    mask_id=model.cfg.mask_id,
                    null_class=model.cfg.null_class,
                    generator=torch.Generator().manual_seed(1),
                )  # fmt: skip
            )
    for step, (a, b) in enumerate(zip(eager.logits, compiled.logits, strict=True)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert torch.equal(results[0].tokens, results[1].tokens)


# The planned fast path (magnets.decoding.plan + PlannedLogits): the same tokens, the same work, static shapes.

MIXED = ModelSchedule("mixed", (8, 1, 4, 1, 2), (2, 1, 1, 2, 1)).width_per_step(WIDTHS)  # switches back and forth


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN, MIXED, [1] * 7])
@pytest.mark.parametrize(("guidance", "pre_reveal"), [(0.0, 0), (2.0, 0), (0.0, 5), (1.5, 6)])
def test_planned_path_reveals_exactly_the_eager_tokens(cache, schedule, guidance, pre_reveal):
    """Same generator, same model calls: the same logits bit for bit, the same tokens and the same reported work."""
    model = make_model(depth=2)
    options = {"guidance": guidance, "pre_reveal": pre_reveal, "keep_history": True}
    _, eager, eager_logits = run(model, schedule, cache, **options)
    _, planned, planned_logits = run(model, schedule, cache, fast=True, **options)
    for step, (a, b) in enumerate(zip(eager_logits, planned_logits, strict=True)):
        assert torch.equal(a, b), f"step {step}: logits differ by {(a - b).abs().max():.3g}"
    assert torch.equal(planned.history, eager.history)
    assert planned.work == eager.work


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize(("guidance", "pre_reveal"), [(0.0, 0), (2.0, 4)])
def test_plan_is_what_the_eager_decoder_ran(cache, guidance, pre_reveal):
    """Every step's width, kind, queries, cache length and head positions, planned before the first step."""
    model = make_model(depth=2)
    _, result, logits = run(model, MIXED, cache, guidance=guidance, pre_reveal=pre_reveal, batch=2)
    plan = plan_decode(GRID, MIXED, cache, guided=guidance > 0, num_masked=GRID - pre_reveal)
    assert plan.work(samples=2) == result.work
    rows = 4 if guidance else 2
    for step, (planned, step_logits) in enumerate(zip(plan.steps, logits, strict=True)):
        assert step_logits.shape == (rows, planned.masked_before, model.cfg.codebook_size), f"step {step}"
        assert planned.reveal == result.revealed[step]
    if cache == "none":
        assert all(s.kind == "full" and s.queries == GRID for s in plan.steps)
    else:
        assert plan.steps[0].kind == "refresh" and any(s.kind == "cached" and s.cached > 0 for s in plan.steps)


def test_plan_counts_by_hand():
    """16 tokens, 4 masked-token counts by hand: cosine over 4 steps leaves 14, 11, 6, 0 masked."""
    plan = plan_decode(16, [8, 8, 1, 1], "refresh_on_switch")
    assert [(s.kind, s.masked_before, s.queries, s.cached, s.just_revealed) for s in plan.steps] == [
        ("refresh", 16, 16, 0, 0),
        ("cached", 14, 16, 0, 2),  # the 2 revealed at step 0 plus the 14 still masked; nothing cached yet
        ("refresh", 11, 16, 0, 0),
        ("cached", 6, 11, 5, 5),  # 5 revealed at step 2 plus 6 masked, against the 5 entries the refresh kept
    ]
    given = plan_decode(16, [1, 1, 1], "no_refresh", num_masked=10)  # 6 given (frame prediction): 10, 8, 5 masked
    assert [(s.queries, s.cached, s.masked_before) for s in given.steps] == [(16, 0, 10), (10, 6, 8), (8, 8, 5)]
    assert len(plan.distinct_shapes()) == 4 and plan.steps[1].keys == 16
    with pytest.raises(ValueError, match=r"num_masked must lie in \[1, 16\], got 17"):
        plan_decode(16, [1], "none", num_masked=17)


def test_planned_state_is_reused_across_decodes():
    """A second decode of the same shape reuses the plan and its cache storage and still reveals the eager tokens."""
    model = make_model(depth=2)
    planned = build_tokens_to_logits(model, "refresh_on_switch", fast=True, width_per_step=SCALE_UP)
    run(model, SCALE_UP, "refresh_on_switch", seed=3, tokens_to_logits=planned)
    storage = planned.states[(GRID, 3)].cache.keys.data_ptr()
    _, again, _ = run(model, SCALE_UP, "refresh_on_switch", seed=4, tokens_to_logits=planned)
    _, eager, _ = run(model, SCALE_UP, "refresh_on_switch", seed=4)
    assert torch.equal(again.tokens, eager.tokens)
    assert list(planned.states) == [(GRID, 3)] and planned.states[(GRID, 3)].cache.keys.data_ptr() == storage
    run(model, SCALE_UP, "refresh_on_switch", pre_reveal=5, tokens_to_logits=planned)  # another task: another plan
    assert sorted(planned.states) == [(GRID - 5, 3), (GRID, 3)]
    assert build_tokens_to_logits(model, "refresh_on_switch", fast=True, width_per_step=SCALE_UP) is planned
    assert build_tokens_to_logits(model, "no_refresh", fast=True, width_per_step=SCALE_UP) is not planned
    model.double()  # the weights move: captured steps would read the old storage
    assert build_tokens_to_logits(model, "refresh_on_switch", fast=True, width_per_step=SCALE_UP) is not planned


def test_planned_path_refuses_a_step_off_its_plan():
    model = make_model(depth=1)
    planned = build_tokens_to_logits(model, "refresh_on_switch", fast=True, width_per_step=SCALE_UP)
    tokens, labels = torch.full((2, GRID), model.cfg.mask_id), torch.tensor([0, 1])
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"step 0 runs width 1 but the plan has 8"):
            planned(tokens, labels, 1, 0)
        planned(tokens, labels, 8, 0)
        with pytest.raises(ValueError, match="expected step 0 or 1, got 2"):
            planned(tokens, labels, 8, 2)
    with pytest.raises(ValueError, match="needs the decode's width_per_step"):
        build_tokens_to_logits(model, "none", fast=True)


def test_ascending_positions_match_nonzero():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 40, generator=generator)
    mask = scores < scores.kthvalue(17, dim=1, keepdim=True).values  # 16 True per row, scattered
    expected = mask.nonzero()[:, 1].view(5, 16)
    assert torch.equal(ascending_positions(mask, 16), expected)
    assert torch.equal(ascending_positions(~mask, 24), (~mask).nonzero()[:, 1].view(5, 24))


@pytest.mark.slow  # torch.compile on the CPU: about a minute on 2 cores
def test_static_compile_of_the_planned_path_compiles_each_step_shape_once():
    """decode.fast + decode.compile: one static-shape graph per distinct step shape, reused by a second decode."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model(depth=1)
    schedule = [8, 8, 1]
    planned = build_tokens_to_logits(model, "refresh_on_switch", compile=True, fast=True, width_per_step=schedule)
    _, eager, eager_logits = run(model, schedule, "refresh_on_switch")
    graphs = []
    for _ in range(2):
        _, fast, fast_logits = run(model, schedule, "refresh_on_switch", tokens_to_logits=planned)
        for a, b in zip(eager_logits, fast_logits, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert torch.equal(fast.tokens, eager.tokens)
        graphs.append(counters["stats"]["unique_graphs"])
    plan = plan_decode(GRID, schedule, "refresh_on_switch")
    # The cache writes run eagerly (graph breaks), so a step is a few graphs; the second decode compiles nothing.
    assert len(plan.distinct_shapes()) == 3 and graphs[0] >= 3 and graphs[1] == graphs[0]
