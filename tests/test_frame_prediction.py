"""Frame prediction and the 3D token grid: given tokens are never masked or changed, caches stay exact, FLOPs are counted."""

from __future__ import annotations

import pytest
import torch

from conftest import flop_counter
from magnets.choices import CACHE_MODES
from magnets.decoding.cache import build_tokens_to_logits
from magnets.decoding.flops import decode_flops_per_sample
from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.plan import plan_decode
from magnets.decoding.schedules import ModelSchedule
from magnets.errors import ConfigError
from magnets.evaluation import DecodeConditions, generate_samples
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import random_training_mask
from magnets.models.transformer import NestedTransformer, TransformerConfig
from magnets.task import Task, build_task

WIDTHS = [8, 4, 2, 1]
GRID_3D = [3, 2, 3]  # (t, h, w): 18 tokens, a latent frame is 6
FRAME = 6
N = 18
SCALE_UP = ModelSchedule("up", (8, 4, 2, 1), (2, 1, 2, 2)).width_per_step(WIDTHS)
SCALE_DOWN = ModelSchedule("down", (1, 2, 8), (2, 2, 2)).width_per_step(WIDTHS)
TINY_CAUSAL = {"frames": 9, "image_size": 16, "temporal_downsample": 4, "channels": [8, 8, 8]}  # grid (3, 4, 4)


def make_model(depth: int, dtype: torch.dtype = torch.float32, codebook: int = 12) -> NestedTransformer:
    """A small nested model on the 3D grid, random weights of std 0.5 so that every token's context moves the logits."""
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=codebook, grid=GRID_3D, num_classes=3, dim=32, depth=depth, heads=2, mlp_dim=64)
    model = NestedTransformer(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model.to(dtype).eval()


def real_tokens(batch: int = 3, codebook: int = 12) -> torch.Tensor:
    return torch.randint(0, codebook, (batch, N), generator=torch.Generator().manual_seed(7))


def run(model, width_per_step, cache, task: Task, *, guidance=0.0, refresh_every=2, keep_history=False):
    """Decode 3 samples starting from ``task``'s given tokens of fixed real items; returns (start, result, logits per step)."""
    cfg = model.cfg
    start = task.decode_start(real_tokens(), 3, cfg.num_tokens, cfg.mask_id)
    labels = task.model_labels(torch.arange(3) % cfg.num_classes, cfg.null_class)
    logits = []
    inner = build_tokens_to_logits(model, cache, refresh_every)

    def recorder(tokens, labels, width, step):
        out, work = inner(tokens, labels, width, step)
        logits.append(out.detach().clone())
        return out, work

    settings = SamplingSettings(guidance_scale=guidance)
    with torch.inference_mode():
        result = decode(
            recorder, start, labels, width_per_step, settings, mask_id=cfg.mask_id, null_class=cfg.null_class,
            generator=torch.Generator().manual_seed(1), keep_history=keep_history,
        )  # fmt: skip
    return start, result, logits


FRAME_PRED = Task("frame_pred", given_tokens=FRAME, use_class=False)
CLASS_COND = Task()


def test_training_masks_never_cover_given_tokens_and_count_only_maskable_positions():
    maskable = FRAME_PRED.maskable(N)
    assert maskable.tolist() == [False] * FRAME + [True] * (N - FRAME)
    mask = random_training_mask(4000, N, generator=torch.Generator().manual_seed(0), maskable=maskable)
    assert not bool(mask[:, :FRAME].any())
    assert bool((mask.sum(1) >= 1).all()) and int(mask.sum(1).max()) == N - FRAME  # at r ~ 0 every maskable one
    # The masked count follows the cosine ratio of the M = 12 maskable positions: E[max(1, ceil(M cos(pi r / 2)))] / M.
    r = (torch.arange(100_000) + 0.5) / 100_000
    expected = (torch.cos(r * torch.pi / 2) * (N - FRAME)).ceil().clamp(min=1).mean() / (N - FRAME)
    assert mask[:, FRAME:].float().mean() == pytest.approx(float(expected), abs=0.01)
    # Without ``maskable`` the draws are the ones the class-conditional runs always made.
    generator_a, generator_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    every = torch.ones(N, dtype=torch.bool)
    assert torch.equal(
        random_training_mask(8, N, generator=generator_a), random_training_mask(8, N, generator=generator_b, maskable=every)
    )


def test_training_step_loss_runs_on_predicted_positions_only_and_with_the_null_class(monkeypatch):
    model_cfg = {"codebook_size": 12, "grid": GRID_3D, "num_classes": 3, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}
    module = NestedMaskGITModule(model=model_cfg, task=FRAME_PRED.as_dict(), label_dropout=0.0)
    seen = {}

    def spy(inputs, targets, mask, labels, alpha, label_smoothing=0.0):
        seen.update(inputs=inputs, targets=targets, mask=mask, labels=labels)
        return {p: (torch.zeros((), requires_grad=True), torch.zeros(())) for p in module.widths}

    monkeypatch.setattr(module, "width_losses", spy)
    tokens, labels = real_tokens(64), torch.arange(64) % 3
    module.training_step((tokens, labels), 0)
    assert not bool(seen["mask"][:, :FRAME].any()), "a given token was masked: it would carry loss"
    assert torch.equal(seen["inputs"][:, :FRAME], tokens[:, :FRAME])
    assert bool((seen["labels"] == module.model.cfg.null_class).all())
    module.validation_step((tokens, labels), 0)
    assert not bool(seen["mask"][:, :FRAME].any()) and bool((seen["labels"] == 3).all())
    with_class = NestedMaskGITModule(model=model_cfg, task={**FRAME_PRED.as_dict(), "use_class": True}, label_dropout=0.0)
    monkeypatch.setattr(with_class, "width_losses", spy)
    with_class.training_step((tokens, labels), 0)
    assert torch.equal(seen["labels"], labels)


def test_loss_ignores_the_given_positions_logits():
    """The loss reads logits at masked positions only, so scrambling the head's output at given positions changes nothing."""
    model_cfg = {"codebook_size": 12, "grid": GRID_3D, "num_classes": 3, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}
    module = NestedMaskGITModule(model=model_cfg, task=FRAME_PRED.as_dict())
    tokens = real_tokens(16)
    inputs, mask = module._mask(tokens, torch.Generator().manual_seed(0))
    labels = torch.full((16,), 3)
    reference = module.width_losses(inputs, tokens, mask, labels, alpha=0.5)
    forward = module.model.forward

    def scrambled(tokens, labels, width):
        logits = forward(tokens, labels, width).clone()
        logits[:, :FRAME] = torch.randn_like(logits[:, :FRAME]) * 100
        return logits

    module.model.forward = scrambled
    changed = module.width_losses(inputs, tokens, mask, labels, alpha=0.5)
    for p in module.widths:
        assert torch.equal(reference[p][0], changed[p][0])


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN])
def test_given_tokens_are_unchanged_in_every_decode_output(cache, schedule):
    model = make_model(depth=2)
    start, result, _ = run(model, schedule, cache, FRAME_PRED, guidance=1.0, keep_history=True)
    for step, tokens in enumerate(result.history):
        assert torch.equal(tokens[:, :FRAME], start[:, :FRAME]), f"step {step} changed a given token"
    assert not bool((result.tokens == model.cfg.mask_id).any())
    assert sum(result.revealed) == N - FRAME


@pytest.mark.parametrize("task", [CLASS_COND, FRAME_PRED], ids=["class_cond", "frame_pred"])
@pytest.mark.parametrize("schedule", [SCALE_UP, SCALE_DOWN, [1] * 7])
def test_3d_refresh_every_step_gives_exactly_the_uncached_tokens(task, schedule):
    model = make_model(depth=2)
    _, uncached, _ = run(model, schedule, "none", task, guidance=1.5)
    _, cached, _ = run(model, schedule, "refresh_every_n", task, guidance=1.5, refresh_every=1)
    assert torch.equal(cached.tokens, uncached.tokens)


CACHE_NEVER_STALE = [
    *[("refresh_on_switch", schedule) for schedule in (SCALE_UP, SCALE_DOWN)],
    *[(mode, [p] * 7) for mode in ("refresh_on_switch", "no_refresh", "refresh_every_n") for p in (1, 4)],
]


@pytest.mark.parametrize(("mode", "schedule"), CACHE_NEVER_STALE)
@pytest.mark.parametrize("task", [CLASS_COND, FRAME_PRED], ids=["class_cond", "frame_pred"])
def test_3d_depth_one_cache_matches_uncached_decoding(mode, schedule, task):
    """One layer: entries depend only on a token's embedding and width; given tokens enter the cache at every refresh."""
    model = make_model(depth=1, dtype=torch.float64)
    _, reference, reference_logits = run(model, schedule, "none", task)
    _, candidate, logits = run(model, schedule, mode, task)
    assert any(w.kind == "cached" for w in candidate.work)
    for step, (a, b) in enumerate(zip(reference_logits, logits, strict=True)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"step {step}: logits differ by {(a - b).abs().max():.3g}"
    assert torch.equal(reference.tokens, candidate.tokens)


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_planned_work_with_given_tokens_is_what_the_decoder_did(cache):
    model = make_model(depth=2)
    _, result, _ = run(model, SCALE_UP, cache, FRAME_PRED)
    planned = plan_decode(model.cfg.num_tokens, SCALE_UP, cache, num_masked=N - FRAME).work()
    assert [(w.width, w.kind, w.queries, w.keys, w.head_positions) for w in result.work] == [
        (p.width, p.kind, p.queries, p.keys, p.head_positions) for p in planned
    ]
    if cache != "none":  # the given tokens are never queries of a cached step: their keys/values come from the cache
        assert all(w.queries <= N - FRAME for w in result.work if w.kind == "cached")


@pytest.mark.parametrize(("cache", "guidance"), [("none", 0.0), ("refresh_on_switch", 0.0), ("no_refresh", 2.0)])
def test_flops_with_given_tokens_match_the_flop_counter(cache, guidance):
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=64, grid=[4, 4, 4], num_classes=3, dim=64, depth=2, heads=4, mlp_dim=128)
    model = NestedTransformer(cfg).eval()
    task = Task("frame_pred", given_tokens=32, use_class=False)
    schedule = ModelSchedule("up", (8, 4, 2, 1), (2, 2, 2, 2)).width_per_step(WIDTHS)
    real = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    start = task.decode_start(real, 2, 64, cfg.mask_id)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        result = decode(
            build_tokens_to_logits(model, cache), start, torch.full((2,), 3), schedule, SamplingSettings(guidance_scale=guidance),
            mask_id=cfg.mask_id, null_class=3,
        )  # fmt: skip
    analytic = decode_flops_per_sample(cfg, result.work, samples=2)
    assert analytic == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    planned = plan_decode(cfg.num_tokens, schedule, cache, guided=guidance > 0, num_masked=32).work()
    assert decode_flops_per_sample(cfg, planned, samples=1) == pytest.approx(analytic)
    full = plan_decode(cfg.num_tokens, schedule, cache, guided=guidance > 0).work()
    assert decode_flops_per_sample(cfg, planned, 1) < decode_flops_per_sample(cfg, full, 1)


class GridTokenizer:
    """A stand-in tokenizer for the media seam: code ids [B, t, h, w] -> clips [B, 1, t, h, w] of id / codebook."""

    grid = tuple(GRID_3D)
    codebook_size = 12

    def eval(self):
        return self

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, None].float() / self.codebook_size


def test_generate_samples_keeps_each_items_given_tokens_and_reports_its_class():
    model = make_model(depth=2)
    real = real_tokens(5)
    conditions = DecodeConditions(torch.tensor([0, 1, 2, 0, 1]), real)
    batches = list(
        generate_samples(
            model, GridTokenizer(), FRAME_PRED, conditions, SCALE_UP, SamplingSettings(), "refresh_on_switch", batch_size=2
        )
    )
    tokens = torch.cat([b.tokens for b in batches])
    assert [len(b.tokens) for b in batches] == [2, 2, 1]
    assert torch.equal(tokens[:, :FRAME], real[:, :FRAME])
    assert torch.equal(torch.cat([b.labels for b in batches]), conditions.labels)
    clips = torch.cat([b.images for b in batches])
    assert clips.shape == (5, 1, *GRID_3D)
    with pytest.raises(ValueError, match=r"decodes from real tokens \[2, 18\], got None"):
        list(
            generate_samples(
                model, GridTokenizer(), FRAME_PRED, DecodeConditions(torch.tensor([0, 1])), SCALE_UP, SamplingSettings(), "none"
            )
        )


def test_build_task_turns_conditioning_frames_into_whole_latent_frames():
    task = build_task({"name": "frame_pred", "cond_frames": 5, "use_class": False}, "causal3d", TINY_CAUSAL)
    assert (task.given_tokens, task.use_class) == (2 * 16, False)  # 1 + 4*1 frames -> 2 latent frames of 4x4 tokens
    assert build_task({"name": "frame_pred", "cond_frames": 1, "use_class": True}, "causal3d", TINY_CAUSAL).given_tokens == 16
    assert build_task({"name": "class_cond"}, "causal3d", TINY_CAUSAL) == Task()
    with pytest.raises(ConfigError, match=r"task.cond_frames=4 is not valid; valid: 1 \+ 4 \* c frames"):
        build_task({"name": "frame_pred", "cond_frames": 4, "use_class": False}, "causal3d", TINY_CAUSAL)
    with pytest.raises(ConfigError, match="task.cond_frames=9 is not valid; valid: fewer frames than the clip's 9"):
        build_task({"name": "frame_pred", "cond_frames": 9, "use_class": False}, "causal3d", TINY_CAUSAL)
    image_tokenizer = {"image_size": 32, "channels": [8, 8], "codebook_size": 16, "code_dim": 8}
    with pytest.raises(
        ConfigError, match="task='frame_pred' is not valid; valid: class_cond: tokenizer kind 'vq2d' makes images"
    ):
        build_task({"name": "frame_pred", "cond_frames": 5, "use_class": False}, "vq2d", image_tokenizer)
    with pytest.raises(ConfigError, match=r"task.name='video' is not valid; valid: class_cond, frame_pred"):
        build_task({"name": "video"}, "causal3d", TINY_CAUSAL)
