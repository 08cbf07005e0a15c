"""Decode policies: token groups of different widths in one pass, partial refresh, guidance apart, schedule orders.

Each degenerate setting is checked against the decoders it must reduce to
(the plain cache callables, not the policy code itself), and each working
setting against an independent computation or a count made by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import flop_counter
from magnets.decoding.cache import build_tokens_to_logits
from magnets.decoding.flops import decode_flops_per_sample, forward_flops
from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.plan import plan_decode
from magnets.decoding.policies import PolicyLogits, RouteSettings, TokenGroup, build_decode_callables, merge_groups
from magnets.decoding.schedules import ModelSchedule, load_schedule, shipped_schedules
from magnets.models.transformer import NestedTransformer, TransformerConfig
from test_decoding import ABRUPT, GRID, SCALE_DOWN, SCALE_UP, WIDTHS, make_model


def run_policy(model, schedule, tokens_to_logits, *, settings=None, unconditional=None, pre_reveal=0, batch=3, seed=1):
    """Decode ``batch`` rows through ``tokens_to_logits``; returns (result, the logits of every call)."""
    cfg = model.cfg
    data = torch.Generator().manual_seed(123)
    tokens = torch.full((batch, GRID), cfg.mask_id)
    if pre_reveal:
        positions = torch.stack([torch.randperm(GRID, generator=data)[:pre_reveal] for _ in range(batch)])
        tokens.scatter_(1, positions, torch.randint(0, cfg.codebook_size, (batch, pre_reveal), generator=data))
    labels = torch.arange(batch) % cfg.num_classes
    seen = []

    def recording(tokens, labels, width, step):
        logits, work = tokens_to_logits(tokens, labels, width, step)
        seen.append(logits.clone())
        return logits, work

    with torch.inference_mode():
        result = decode(
            recording, tokens, labels, schedule, settings or SamplingSettings(), mask_id=cfg.mask_id,
            null_class=cfg.null_class, generator=torch.Generator().manual_seed(seed), unconditional_logits=unconditional,
            keep_history=True,
        )  # fmt: skip
    return result, seen


def assert_same(reference, candidate):
    (ref, ref_logits), (got, logits) = reference, candidate
    assert len(ref_logits) == len(logits)
    for step, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
        assert torch.equal(a, b), f"step {step}: logits differ by {(a - b).abs().max():.3g}"
    assert torch.equal(ref.tokens, got.tokens)


# --- the model: token groups of different widths in one pass ---------------------------------------------------------


def test_groups_of_one_width_are_the_single_pass_in_any_order():
    """Two groups at one width, the second listed first, give the single pass's streams (attention is order-free)."""
    model = make_model(depth=3, dtype=torch.float64)
    tokens, labels = torch.randint(0, 12, (2, GRID)), torch.tensor([0, 2])
    d = model.cfg.stream_width(2)
    with torch.no_grad():
        reference = model.hidden(tokens, labels, 2)  # [2, N, d]
        order = torch.randperm(GRID, generator=torch.Generator().manual_seed(0)).expand(2, -1)
        first, second = order[:, :5], order[:, 5:]
        streams = [model.embed(tokens.gather(1, p), labels, d, p) for p in (first, second)]
        out_first, out_second = model.run_layers(streams, range(3))
    assert torch.allclose(out_first, reference.gather(1, first[..., None].expand(-1, -1, d)), atol=1e-12)
    assert torch.allclose(out_second, reference.gather(1, second[..., None].expand(-1, -1, d)), atol=1e-12)


def test_mixed_width_pass_matches_a_hand_written_layer():
    """One layer, groups at widths 8 and 1, against the layer written out by hand from the weights."""
    model = make_model(depth=1, dtype=torch.float64)
    cfg, block = model.cfg, model.blocks[0]
    x_small, x_full = torch.randn(2, 3, cfg.dim // 8, dtype=torch.float64), torch.randn(2, 5, cfg.dim, dtype=torch.float64)

    def by_hand(x):
        d = x.shape[-1]
        norm = torch.nn.functional.layer_norm(x, (d,), block.norm1.weight[:d], block.norm1.bias[:d])
        return norm @ block.qkv.weight[:, :d].T + block.qkv.bias  # [B, Q, 3D]

    qkv = torch.cat([by_hand(x_small), by_hand(x_full)], dim=1)  # [2, 8, 3D]
    q, k, v = (t.view(2, 8, cfg.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.dim // cfg.heads)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, cfg.dim)  # [2, 8, D]
    expected = []
    for x, a in ((x_small, attn[:, :3]), (x_full, attn[:, 3:])):
        d = x.shape[-1]
        x = x + a @ block.attn_out.weight[:d].T + block.attn_out.bias[:d]
        norm = torch.nn.functional.layer_norm(x, (d,), block.norm2.weight[:d], block.norm2.bias[:d])
        hidden = torch.nn.functional.gelu(norm @ block.mlp_in.weight[:, :d].T + block.mlp_in.bias)
        expected.append(x + hidden @ block.mlp_out.weight[:d].T + block.mlp_out.bias[:d])
    with torch.no_grad():
        got = block.forward_groups([x_small, x_full])
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-10)


def test_merge_groups_keeps_the_head_at_the_tail():
    p = torch.arange(6).view(1, 6)
    context, top, rest = TokenGroup(p[:, :2], 4, 2), TokenGroup(p[:, 2:4], 4, 0), TokenGroup(p[:, 4:], 8, 0)
    merged = merge_groups([context, TokenGroup(p[:, :0], 8, 0), top, rest])
    assert [(g.count, g.width, g.head_from) for g in merged] == [(4, 4, 2), (2, 8, 0)]
    # A head group followed by a context group of the same width cannot merge: the head would not be the tail.
    assert len(merge_groups([TokenGroup(p[:, :2], 4, 0), TokenGroup(p[:, 2:4], 4, 2)])) == 2


# --- routing -------------------------------------------------------------------------------------------------------

PLAIN_MODES = ["none", "refresh_on_switch", "no_refresh", "refresh_every_n"]


@pytest.mark.parametrize("cache", PLAIN_MODES)
@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN])
@pytest.mark.parametrize(
    "route", [RouteSettings("confidence", width=8, fraction=1.0), RouteSettings("context", width=1)], ids=["all-kept", "ctx-wide"]
)
def test_routing_every_token_at_the_step_width_is_the_plain_decode(cache, schedule, route):
    """Every token at its step's width (fraction 1, or a route width never narrower than a step's): token for token."""
    model = make_model(depth=2)
    reference = run_policy(model, schedule, build_tokens_to_logits(model, cache))
    candidate = run_policy(model, schedule, PolicyLogits(model, cache, route=route))
    assert_same(reference, candidate)


@pytest.mark.parametrize("cache", ["none", "refresh_on_switch"])
@pytest.mark.parametrize("pre_reveal", [0, 5])
def test_routing_all_masked_tokens_narrow_at_depth_one_is_the_narrow_decode(cache, pre_reveal):
    """One layer, context routed to m_8 on an m_8 schedule run under an m_1 label: the decode of m_8 itself."""
    model = make_model(depth=1, dtype=torch.float64)
    schedule = [8] * 6
    reference = run_policy(model, schedule, build_tokens_to_logits(model, cache), pre_reveal=pre_reveal)
    candidate = run_policy(
        model, schedule, PolicyLogits(model, cache, route=RouteSettings("context", width=8)), pre_reveal=pre_reveal
    )
    for a, b in zip(reference[1], candidate[1], strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.equal(reference[0].tokens, candidate[0].tokens)


def test_confidence_routing_runs_the_confident_tokens_wide_and_the_rest_narrow():
    """Step 1's groups, by hand from step 0's logits: the top quarter of the masked positions by best log-probability."""
    model = make_model(depth=2, dtype=torch.float64)
    policy = PolicyLogits(model, "none", route=RouteSettings("confidence", width=8, fraction=0.25))
    groups_seen = []

    def spy(tokens, labels, width, step):
        out = policy(tokens, labels, width, step)
        groups_seen.append([(g.width, g.positions[:, g.head_from :].clone()) for g in policy.groups])
        return out

    result, logits = run_policy(model, [1, 1, 1, 1], spy, batch=2)
    best0 = torch.log_softmax(logits[0], dim=-1).amax(-1)  # [B, N]: step 0 ran every position, all masked
    after0 = result.history[0] == model.cfg.mask_id  # [B, N]: masked at step 1
    masked1 = int(after0[0].sum())
    keep = math.ceil(0.25 * masked1)
    (wide_width, wide), (narrow_width, narrow) = [g for g in groups_seen[1] if g[1].shape[1]]
    assert (wide_width, narrow_width) == (1, 8)
    for row in range(2):
        expected = best0[row].masked_fill(~after0[row], -math.inf).topk(keep).indices.sort().values
        assert torch.equal(wide[row], expected)
        assert set(narrow[row].tolist()) == set(after0[row].nonzero()[:, 0].tolist()) - set(expected.tolist())
    step1 = [w for w in result.work if w.kind == "full"][1:3]  # step 1: context + confident (merged at m_1), unsure
    assert [(w.width, w.head_positions) for w in step1] == [(1, keep), (8, masked1 - keep)]


def test_confidence_routing_changes_the_decode_and_costs_less():
    model = make_model(depth=2)
    schedule = [1] * 6
    plain, _ = run_policy(model, schedule, build_tokens_to_logits(model, "refresh_on_switch"))
    routed, _ = run_policy(
        model, schedule, PolicyLogits(model, "refresh_on_switch", route=RouteSettings("confidence", width=8, fraction=0.5))
    )
    cfg = model.cfg
    assert decode_flops_per_sample(cfg, routed.work, 3) < decode_flops_per_sample(cfg, plain.work, 3)
    assert not torch.equal(plain.tokens, routed.tokens)


def test_context_routing_writes_narrow_keys_into_the_cache():
    """One layer: a cached key depends on its token alone, so every entry must be the key m_8 computes for it."""
    model = make_model(depth=1, dtype=torch.float64)
    policy = PolicyLogits(model, "no_refresh", route=RouteSettings("context", width=8))
    result, _ = run_policy(model, [1] * 4, policy, batch=1)
    before_last = result.history[-2]  # the tokens the cache holds: revealed before the last step
    positions = (before_last[0] != model.cfg.mask_id).nonzero()[:, 0][None]  # [1, R]
    block, cfg = model.blocks[0], model.cfg

    def keys_at(width):
        d = cfg.stream_width(width)
        x = model.embed(before_last.gather(1, positions), torch.tensor([0]), d, positions)
        norm = torch.nn.functional.layer_norm(x, (d,), block.norm1.weight[:d], block.norm1.bias[:d])
        k = (norm @ block.qkv.weight[cfg.dim : 2 * cfg.dim, :d].T + block.qkv.bias[cfg.dim : 2 * cfg.dim])[0]  # [R, D]
        return k.view(-1, cfg.heads, cfg.dim // cfg.heads).transpose(0, 1)  # [H, R, D/H]

    cached = policy.cache.keys[0, 0, :, : policy.cache.length]  # [H, R, D/H], slots in cache order
    assert cached.shape[1] == positions.shape[1]
    with torch.no_grad():
        narrow, wide = keys_at(8), keys_at(1)

    def as_rows(k):  # order-free comparison: the slots' order is the cache's, not the grid's
        return sorted(map(tuple, k.transpose(0, 1).reshape(k.shape[1], -1).round(decimals=9).tolist()))

    assert as_rows(cached) == as_rows(narrow)
    assert as_rows(cached) != as_rows(wide)


# --- partial refresh ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN, ABRUPT])
@pytest.mark.parametrize("pre_reveal", [0, 5])
@pytest.mark.parametrize(("layer", "equals"), [(0, "refresh_on_switch"), (3, "no_refresh")])
def test_partial_refresh_from_layer_zero_and_depth_are_the_full_modes(schedule, pre_reveal, layer, equals):
    model = make_model(depth=3)
    reference = run_policy(model, schedule, build_tokens_to_logits(model, equals), pre_reveal=pre_reveal)
    candidate = run_policy(model, schedule, PolicyLogits(model, "refresh_from_layer", refresh_layer=layer), pre_reveal=pre_reveal)
    for step, (a, b) in enumerate(zip(reference[1], candidate[1], strict=True)):
        assert torch.allclose(a, b, atol=1e-5), f"step {step}: {(a - b).abs().max():.3g}"
    assert torch.equal(reference[0].tokens, candidate[0].tokens)
    ref_flops = decode_flops_per_sample(model.cfg, reference[0].work, 3)
    assert decode_flops_per_sample(model.cfg, candidate[0].work, 3) == ref_flops


def test_partial_refresh_in_between_differs_from_both_and_costs_between():
    model = make_model(depth=3)
    cfg = model.cfg
    outcomes = {}
    for name, callable_ in (
        ("on_switch", build_tokens_to_logits(model, "refresh_on_switch")),
        ("partial", PolicyLogits(model, "refresh_from_layer", refresh_layer=2)),
        ("never", build_tokens_to_logits(model, "no_refresh")),
    ):
        result, logits = run_policy(model, SCALE_UP, callable_)
        outcomes[name] = (decode_flops_per_sample(cfg, result.work, 3), logits)
    assert outcomes["never"][0] < outcomes["partial"][0] < outcomes["on_switch"][0]
    switch_step = 2  # SCALE_UP's first switch (8, 8 -> 4)
    for other in ("on_switch", "never"):
        assert not torch.allclose(outcomes["partial"][1][switch_step], outcomes[other][1][switch_step], atol=1e-4)


def test_partial_refresh_flops_by_hand():
    """A switch at layer L of depth 3: layers below run the Q new queries against C cached, layers above all N."""
    cfg = TransformerConfig(codebook_size=12, grid=[GRID], num_classes=3, dim=32, depth=3, heads=2, mlp_dim=64, widths=WIDTHS)
    model = NestedTransformer(cfg).eval()
    result, _ = run_policy(model, [8, 8, 4], PolicyLogits(model, "refresh_from_layer", refresh_layer=1), batch=1)
    partial = [w for w in result.work if w.kind == "partial"]
    masked = [GRID - sum(result.revealed[:k]) for k in range(3)]  # masked before each step
    queries = masked[1]  # just revealed at step 1 + still masked at step 2
    cached = GRID - queries
    expected = forward_flops(cfg, 4, queries, cached + queries, 0, layers=1) + forward_flops(
        cfg, 4, GRID, GRID, masked[2], layers=2
    )
    assert decode_flops_per_sample(cfg, partial, 1) == expected


# --- guidance apart ----------------------------------------------------------------------------------------------------


def test_guidance_apart_at_equal_widths_is_todays_guidance():
    """Unconditional pass apart, at the step's width on every step: the batched guidance's tokens."""
    model = make_model(depth=2, dtype=torch.float64)
    together = SamplingSettings(guidance_scale=2.0)
    apart = SamplingSettings(guidance_scale=2.0, guidance_width=8)  # never narrower than SCALE_UP's m_8 steps...
    schedule = [8] * 5  # ... on an m_8 schedule: the same width every step
    reference, ref_logits = run_policy(model, schedule, build_tokens_to_logits(model, "refresh_on_switch"), settings=together)
    conditional, unconditional = build_decode_callables(model, apart, "refresh_on_switch")
    candidate, logits = run_policy(model, schedule, conditional, settings=apart, unconditional=unconditional)
    assert torch.equal(reference.tokens, candidate.tokens)
    for a, b in zip(ref_logits, logits, strict=True):  # the batched call's first half is the conditional call
        assert torch.allclose(a[: len(b)], b, atol=1e-12)


def test_narrow_unconditional_pass_and_last_steps_guidance_count_their_flops():
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=64, grid=[64], num_classes=3, dim=64, depth=2, heads=4, mlp_dim=128, widths=WIDTHS)
    model = NestedTransformer(cfg).eval()
    schedule = [4, 4, 2, 2, 1, 1]
    tokens, labels = torch.full((2, 64), cfg.mask_id), torch.tensor([0, 1])
    flops = {}
    for name, settings in {
        "batched": SamplingSettings(guidance_scale=2.0),
        "narrow": SamplingSettings(guidance_scale=2.0, guidance_width=8),
        "last": SamplingSettings(guidance_scale=2.0, guidance_steps=2),
    }.items():
        conditional, unconditional = build_decode_callables(model, settings, "refresh_on_switch")
        counter = flop_counter()
        with torch.inference_mode(), counter:
            result = decode(
                conditional, tokens, labels, schedule, settings, mask_id=cfg.mask_id, null_class=3,
                unconditional_logits=unconditional,
            )  # fmt: skip
        flops[name] = decode_flops_per_sample(cfg, result.work, samples=2)
        assert flops[name] == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
        if name == "narrow":
            assert {w.width for w in result.work if w.rows == 2} >= {8}
        if name == "last":
            assert len(result.work) == len(schedule) + 2
    assert flops["narrow"] < flops["batched"] and flops["last"] < flops["batched"]


def test_guidance_apart_needs_its_callable():
    model = make_model(depth=1)
    with pytest.raises(ValueError, match="unconditional_logits"):
        settings = SamplingSettings(guidance_scale=1.0, guidance_steps=1)
        run_policy(model, [1, 1], build_tokens_to_logits(model, "none"), settings=settings)


# --- FLOPs of routed decodes against the counter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "route", "layer"),
    [
        ("none", RouteSettings("confidence", 8, 0.5), 0),
        ("refresh_on_switch", RouteSettings("confidence", 8, 0.25), 0),
        ("no_refresh", RouteSettings("context", 8), 0),
        ("refresh_every_n", RouteSettings("context", 4), 0),
        ("refresh_from_layer", None, 1),
    ],
)
def test_policy_flops_match_the_flop_counter(cache, route, layer):
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=64, grid=[64], num_classes=3, dim=64, depth=2, heads=4, mlp_dim=128, widths=WIDTHS)
    model = NestedTransformer(cfg).eval()
    schedule = ModelSchedule("up", (8, 4, 2, 1), (2, 2, 2, 2)).width_per_step(WIDTHS)
    tokens, labels = torch.full((2, 64), cfg.mask_id), torch.tensor([0, 1])
    counter = flop_counter()
    with torch.inference_mode(), counter:
        result = decode(
            PolicyLogits(model, cache, refresh_layer=layer, route=route), tokens, labels, schedule, SamplingSettings(),
            mask_id=cfg.mask_id, null_class=3,
        )  # fmt: skip
    assert decode_flops_per_sample(cfg, result.work, samples=2) == pytest.approx(counter.get_total_flops() / 2, rel=0.02)


# --- errors --------------------------------------------------------------------------------------------------------


def test_policy_errors_name_the_value_and_the_valid_ones():
    model = make_model(depth=2)
    with pytest.raises(ValueError, match=r"unknown route 'sideways'; valid: \['none', 'confidence', 'context'\]"):
        RouteSettings("sideways")
    with pytest.raises(ValueError, match=r"refresh_layer must lie in \[0, depth=2\], got 3"):
        PolicyLogits(model, "refresh_from_layer", refresh_layer=3)
    with pytest.raises(ValueError, match="route width 3 is not a width"):
        PolicyLogits(model, "none", route=RouteSettings("context", width=3))
    with pytest.raises(ValueError, match="decode.fast=false"):
        build_decode_callables(model, SamplingSettings(), "refresh_from_layer", fast=True, width_per_step=[1])
    with pytest.raises(ValueError, match="has no static plan"):
        plan_decode(16, [1], "refresh_from_layer")


# --- schedule orders -----------------------------------------------------------------------------------------------


def test_shipped_orders_run_their_widths_in_the_named_order():
    names = shipped_schedules()
    sandwich = [n for n in names if n.startswith("sandwich_")]
    down = [n for n in names if n.startswith("scale_down_")]
    assert sandwich and len(down) >= 2
    for name in sandwich:
        widths = load_schedule(name).width_per_step(WIDTHS)
        peak = widths.index(min(widths))  # the widest step
        assert widths[0] > widths[peak] < widths[-1], f"{name}: not small -> large -> small: {widths}"
    for name in down:
        widths = load_schedule(name).width_per_step(WIDTHS)
        assert widths == sorted(widths) and widths[0] < widths[-1], f"{name}: not large -> small: {widths}"


def test_confidence_routing_runs_at_least_the_tokens_a_step_reveals_wide():
    """With the decode's K known, a step keeps its reveal count wide: the last step (it reveals every token) is plain."""
    model = make_model(depth=2, dtype=torch.float64)
    schedule = [1, 1, 1, 1]
    route = RouteSettings("confidence", width=8, fraction=0.1)
    policy = PolicyLogits(model, "refresh_on_switch", route=route, steps=len(schedule))
    widths_seen = []

    def spy(tokens, labels, width, step):
        out = policy(tokens, labels, width, step)
        widths_seen.append([(g.width, g.head_count) for g in policy.groups])
        return out

    result, _ = run_policy(model, schedule, spy, batch=2)
    masked_before = [GRID - sum(result.revealed[:k]) for k in range(len(schedule))]
    for step in range(1, len(schedule)):
        wide = sum(count for width, count in widths_seen[step] if width == 1)
        assert wide == max(math.ceil(0.1 * masked_before[step]), result.revealed[step])
    assert widths_seen[-1] == [(1, masked_before[-1])]  # the last step: every token wide, one group


def test_confidence_routing_with_reveal_wide_reveals_only_tokens_run_wide():
    model = make_model(depth=2, dtype=torch.float64)
    schedule = [1, 1, 1, 1, 1]
    route = RouteSettings("confidence", width=8, fraction=0.25, reveal="wide")
    policy = PolicyLogits(model, "refresh_on_switch", route=route, steps=len(schedule))
    wide_positions = []

    def spy(tokens, labels, width, step):
        out = policy(tokens, labels, width, step)
        masked = (tokens == model.cfg.mask_id).nonzero()[:, 1].view(tokens.shape[0], -1)  # [B, M] ascending
        wide = policy.revealable()
        wide_positions.append(None if wide is None else [set(masked[b][wide[b]].tolist()) for b in range(len(masked))])
        return out

    cfg = model.cfg
    tokens, labels = torch.full((2, GRID), cfg.mask_id), torch.tensor([0, 1])
    with torch.inference_mode():
        result = decode(
            spy, tokens, labels, schedule, SamplingSettings(), mask_id=cfg.mask_id, null_class=cfg.null_class,
            generator=torch.Generator().manual_seed(0), keep_history=True, revealable=policy.revealable,
        )  # fmt: skip
    narrow_steps = [step for step, wide in enumerate(wide_positions) if wide is not None]
    assert narrow_steps, "some step must have run tokens narrow"
    previous = torch.full((2, GRID), cfg.mask_id)
    for step in range(len(schedule)):
        revealed_now = (previous == cfg.mask_id) & (result.history[step] != cfg.mask_id)  # [B, N]
        if wide_positions[step] is not None:
            for b in range(2):
                assert set(revealed_now[b].nonzero()[:, 0].tolist()) <= wide_positions[step][b]
        previous = result.history[step]
    # Without the mask, the same routing reveals some token it ran narrow (the comparison can fail).
    policy_any = PolicyLogits(model, "refresh_on_switch", route=RouteSettings("confidence", 8, 0.25), steps=len(schedule))
    result_any, _ = run_policy(model, schedule, policy_any, batch=2, seed=0)
    assert not torch.equal(result_any.tokens, result.tokens)
