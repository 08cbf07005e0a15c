"""Semantics the other tests leave loose: each test fails on one plausible wrong behaviour, named in its docstring.

Decoding is tested through stub tokens-to-logits callables whose logits are chosen by hand, so each
assertion follows from the algorithm of docs/design.md ("Sampling step") rather than from a trained model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from magnets.decoding.cache import build_tokens_to_logits
from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.plan import StepWork
from magnets.evaluation import balanced_labels
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.masking import decode_masked_counts, random_training_mask
from magnets.models.transformer import NestedTransformer, TransformerConfig

NULL = 3  # the null class of the stubs' decodes (num_classes = 3)
MODEL = dict(codebook_size=16, grid=[8], num_classes=3, dim=32, depth=1, heads=1, mlp_dim=32, widths=[8, 4, 2, 1])


class TableStub:
    """Tokens-to-logits callable: every masked position of a row gets ``cond[pos]``, or ``uncond[pos]`` if its label is null.

    ``cond`` / ``uncond`` are ``[N, V]`` logit tables. Records the (tokens, labels) of each call.
    """

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        self.cond, self.uncond = cond, cond if uncond is None else uncond
        self.mask_id = cond.shape[1]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, tokens, labels, width, step):
        self.calls.append((tokens.clone(), labels.clone()))
        positions = (tokens == self.mask_id).nonzero()[:, 1].view(tokens.shape[0], -1)  # [B, M] ascending
        null = (labels == NULL)[:, None, None]
        logits = torch.where(null, self.uncond[positions], self.cond[positions])
        n = tokens.shape[1]
        return logits, StepWork(width, "full", queries=n, keys=n, head_positions=positions.shape[1], rows=tokens.shape[0])


def run_decode(stub, num_tokens: int, steps: int, batch: int, settings: SamplingSettings, labels=None, seed: int = 0):
    tokens = torch.full((batch, num_tokens), stub.mask_id)
    labels = torch.zeros(batch, dtype=torch.long) if labels is None else labels
    return decode(
        stub, tokens, labels, [1] * steps, settings, mask_id=stub.mask_id, null_class=NULL,
        generator=torch.Generator().manual_seed(seed), keep_history=True,
    )  # fmt: skip


def revealed_per_step(result, mask_id: int) -> torch.Tensor:
    """``[K, B, N]``: True where a token was revealed at step k."""
    masked = result.history == mask_id
    before = torch.cat([torch.ones_like(masked[:1]), masked[:-1]])
    return before & ~masked


class CertainSubset:
    """At step k, ``reveal_k`` random masked positions per row are near-certain of token 0; the others are flat.

    ``reveal_k`` is the number the step must reveal (``decode_masked_counts``); flat positions spread over V
    codes, so their sampled token has log-probability -log V. Records the certain positions of each step.
    """

    def __init__(self, num_tokens: int, steps: int, vocab: int, margin: float = 40.0) -> None:
        self.mask_id, self.vocab, self.margin = vocab, vocab, margin
        self.masked = [num_tokens, *decode_masked_counts(num_tokens, steps)]
        self.choice = torch.Generator().manual_seed(7)
        self.certain: list[torch.Tensor] = []  # [B, N] per step

    def __call__(self, tokens, labels, width, step):
        b, n = tokens.shape
        positions = (tokens == self.mask_id).nonzero()[:, 1].view(b, -1)  # [B, M]
        reveal = self.masked[step] - self.masked[step + 1]
        picked = torch.rand(positions.shape, generator=self.choice).argsort(dim=1)[:, :reveal]  # [B, reveal] into M
        certain = torch.zeros(b, n, dtype=torch.bool)
        certain.scatter_(1, positions.gather(1, picked), True)
        self.certain.append(certain)
        logits = torch.zeros(b, positions.shape[1], self.vocab)
        logits[..., 0] = self.margin * certain.gather(1, positions)
        return logits, StepWork(width, "full", queries=n, keys=n, head_positions=positions.shape[1], rows=b)


# --- the reveal rule ----------------------------------------------------------------------------------------


def test_each_step_reveals_the_most_confident_tokens():
    """Catches revealing the least confident tokens (``topk(..., largest=False)``): with no choice noise, exactly
    the near-certain positions are revealed at every step, with their certain token."""
    stub = CertainSubset(num_tokens=16, steps=4, vocab=64)
    settings = SamplingSettings(choice_temperature=0.0)
    result = run_decode(stub, 16, 4, batch=16, settings=settings)
    revealed = revealed_per_step(result, stub.mask_id)
    for k in range(3):  # the last step reveals everything left, whatever its confidence
        assert torch.equal(revealed[k], stub.certain[k]), f"step {k} did not reveal the near-certain positions"
        assert bool((result.history[k][revealed[k]] == 0).all())


def test_confidence_is_the_probability_of_the_sampled_token():
    """Catches scoring a position by its best token's probability instead of the token actually sampled: every
    position has p(token 0) = 0.7, so with no choice noise the first step reveals only sampled 0s."""
    cond = torch.zeros(16, 8)
    cond[:, 0] = math.log(0.7 / 0.3 * 7)  # p(0) = 0.7, the other 7 codes 0.3 / 7 each
    settings = SamplingSettings(temperature=1.0, temperature_anneal=0.0, choice_temperature=0.0)
    result = run_decode(TableStub(cond), 16, 4, batch=32, settings=settings)
    first = revealed_per_step(result, 8)[0]
    assert bool((result.history[0][first] == 0).all())


def test_choice_noise_is_large_early_and_vanishes_towards_the_end():
    """Catches a reversed or constant Gumbel choice-noise anneal (docs/design.md: scaled by choice_temperature (1 - (k+1)/K)).

    Near-certain vs flat (log p = -log 1024) positions: at step 0 (noise scale 3.9) flat ones often win; at step
    K-2 (scale 0.56) never."""
    steps = 8
    stub = CertainSubset(num_tokens=64, steps=steps, vocab=1024)
    settings = SamplingSettings(temperature=1.0, temperature_anneal=0.0, choice_temperature=4.5)
    result = run_decode(stub, 64, steps, batch=64, settings=settings)
    revealed = revealed_per_step(result, stub.mask_id)
    wrong = [(revealed[k] & ~stub.certain[k]).sum().item() / revealed[k].sum().item() for k in range(steps)]
    assert wrong[0] > 0.05, f"step 0 noise too small: only {wrong[0]:.3f} of reveals were not the most confident"
    assert wrong[steps - 2] == 0, f"step K-2 noise too large: {wrong[steps - 2]:.3f} of reveals were not the most confident"


def test_decode_masked_counts_follow_the_cosine_schedule():
    """Catches a reversed or shifted mask schedule in decoding (still strictly decreasing, so other tests pass):
    after step k, floor(N cos((k+1)/K pi/2)) stay masked — few tokens revealed early, many late."""
    assert decode_masked_counts(16, 4) == [14, 11, 6, 0]
    assert decode_masked_counts(256, 12) == [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]
    assert decode_masked_counts(20, 4, "linear") == [15, 10, 5, 0]


# --- temperature --------------------------------------------------------------------------------------------


def test_sampling_temperature_anneals_down_to_temperature_at_the_last_step():
    """Catches a reversed anneal: T_k = temperature + anneal (1 - (k+1)/K), highest at step 0."""
    settings = SamplingSettings(temperature=0.5, temperature_anneal=0.8)
    temperatures = [settings.sampling_temperature(k, 12) for k in range(12)]
    assert temperatures[0] == pytest.approx(0.5 + 0.8 * 11 / 12)
    assert temperatures[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:], strict=False))


def test_decode_samples_from_softmax_at_the_annealed_temperature():
    """Catches argmax instead of sampling, a reversed anneal, or decode ignoring the step's temperature.

    Logits (1, 0) over two codes: p(0) = sigmoid(1/T). K=2 with T_0 = 1.25 and T_1 = 0.25; huge choice noise
    makes step 0 reveal random positions, so both steps' revealed tokens are unbiased samples."""
    cond = torch.tensor([1.0, 0.0]).expand(16, 2)
    settings = SamplingSettings(temperature=0.25, temperature_anneal=2.0, choice_temperature=1e4)
    result = run_decode(TableStub(cond), 16, 2, batch=400, settings=settings)
    revealed = revealed_per_step(result, 2)
    share = [(result.history[k][revealed[k]] == 0).float().mean().item() for k in range(2)]
    assert share[0] == pytest.approx(torch.sigmoid(torch.tensor(1 / 1.25)).item(), abs=0.04)  # 0.69 (2000 samples)
    assert share[1] == pytest.approx(torch.sigmoid(torch.tensor(1 / 0.25)).item(), abs=0.015)  # 0.982 (4400 samples)


# --- classifier-free guidance -------------------------------------------------------------------------------


def guidance_tables(cond_ab: tuple[float, float], uncond_ab: tuple[float, float], vocab: int = 6):
    """Tables over 16 positions where codes 0 (a) and 1 (b) get the given logits and all others -30."""
    cond, uncond = torch.full((16, vocab), -30.0), torch.full((16, vocab), -30.0)
    cond[:, :2], uncond[:, :2] = torch.tensor(cond_ab), torch.tensor(uncond_ab)
    return cond, uncond


def test_guidance_moves_away_from_the_unconditional_branch():
    """Catches ``(1 + w) cond + w uncond`` (or swapped branches): conditional favours a (2 vs 1), unconditional b
    (0 vs 3); with w = 2 the guided logits are a: 6, b: -3, so every token is a."""
    stub = TableStub(*guidance_tables((2.0, 1.0), (0.0, 3.0)))
    settings = SamplingSettings(temperature=0.05, temperature_anneal=0.0, guidance_scale=2.0)
    result = run_decode(stub, 16, 4, batch=8, settings=settings, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert bool((result.tokens == 0).all())


def test_guided_logits_are_one_plus_w_cond_minus_w_uncond():
    """Catches any other combination (e.g. ``cond + w uncond``, ``w cond - uncond``, branches swapped): at a
    tiny temperature each sampled token is the argmax of (1 + w) cond - w uncond, at every one of 128 positions."""
    torch.manual_seed(0)
    cond, uncond = 3 * torch.randn(16, 8), 3 * torch.randn(16, 8)
    settings = SamplingSettings(temperature=1e-4, temperature_anneal=0.0, guidance_scale=1.5)
    result = run_decode(TableStub(cond, uncond), 16, 1, batch=8, settings=settings)
    expected = (2.5 * cond - 1.5 * uncond).argmax(dim=-1)
    assert torch.equal(result.tokens, expected.expand(8, -1))
    assert not torch.equal(cond.argmax(-1), expected)  # the check can tell guidance from none


def test_unconditional_rows_carry_the_null_class_after_the_conditional_rows():
    """Catches an unconditional branch that keeps the class labels (then guidance does nothing), or one that runs
    first; and a guided step that runs other tokens in its two halves."""
    stub = TableStub(*guidance_tables((1.0, 0.0), (0.0, 1.0)))
    labels = torch.tensor([0, 2, 1])
    run_decode(stub, 16, 3, batch=3, settings=SamplingSettings(guidance_scale=1.0), labels=labels)
    for tokens, seen in stub.calls:
        assert torch.equal(seen, torch.tensor([0, 2, 1, NULL, NULL, NULL]))
        assert torch.equal(tokens[:3], tokens[3:])
    unguided = TableStub(*guidance_tables((1.0, 0.0), (0.0, 1.0)))
    run_decode(unguided, 16, 3, batch=3, settings=SamplingSettings(guidance_scale=0.0), labels=labels)
    assert all(torch.equal(seen, labels) for _, seen in unguided.calls)  # no unconditional branch without guidance


def test_linear_guidance_ramp_grows_to_w_at_the_last_step():
    """Catches a constant, reversed or unapplied guidance ramp: w_k = w (k+1)/K.

    Guided a - b = (1 + w_k) 1 - w_k 2 = 1 - w_k; with w = 2, K = 4: w_k = 0.5, 1, 1.5, 2, so step 0 reveals a
    and steps 2 and 3 reveal b."""
    settings = SamplingSettings(temperature=0.01, temperature_anneal=0.0, guidance_scale=2.0, guidance_ramp="linear")
    assert [settings.guidance(k, 4) for k in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    stub = TableStub(*guidance_tables((1.0, 0.0), (2.0, 0.0)))
    result = run_decode(stub, 16, 4, batch=8, settings=settings)
    revealed = revealed_per_step(result, stub.mask_id)
    assert bool((result.history[0][revealed[0]] == 0).all())
    assert bool((result.history[2][revealed[2]] == 1).all()) and bool((result.history[3][revealed[3]] == 1).all())


# --- KV cache modes -----------------------------------------------------------------------------------------

R, C = "refresh", "cached"


@pytest.mark.parametrize(
    ("mode", "refresh_every", "kinds"),
    [
        ("refresh_on_switch", 2, [R, C, R, C, C, R, C]),
        ("no_refresh", 2, [R, C, C, C, C, C, C]),  # never refreshes after the first step, even at a width switch
        ("refresh_every_n", 2, [R, C, R, C, R, R, C]),
        ("refresh_every_n", 3, [R, C, R, C, C, R, C]),
    ],
)
def test_cache_modes_refresh_exactly_when_specified(mode, refresh_every, kinds):
    """Catches a mode that refreshes more or less often than docs/design.md says (first step; at a switch unless
    no_refresh; refresh_every_n also after n steps without one), on a real decode of widths 8 8 4 4 4 1 1."""
    torch.manual_seed(0)
    cfg = TransformerConfig(codebook_size=8, grid=[16], num_classes=3, dim=16, depth=1, heads=1, mlp_dim=16, widths=[8, 4, 1])
    model = NestedTransformer(cfg).eval()
    tokens = torch.full((2, 16), cfg.mask_id)
    with torch.inference_mode():
        result = decode(
            build_tokens_to_logits(model, mode, refresh_every), tokens, torch.tensor([0, 1]), [8, 8, 4, 4, 4, 1, 1],
            SamplingSettings(), mask_id=cfg.mask_id, null_class=cfg.null_class, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert [w.kind for w in result.work] == kinds


# --- training -----------------------------------------------------------------------------------------------


def test_training_masks_follow_the_cosine_ratio_at_uniform_positions():
    """Catches a reversed schedule (masking few tokens: mean 1 - 2/pi) or another default schedule, and masks
    that always cover the same positions: the mean masked fraction is E[cos(r pi/2)] = 2/pi (+ rounding up)."""
    masks = random_training_mask(4000, 64, generator=torch.Generator().manual_seed(0))
    mean = masks.float().mean().item()
    assert mean == pytest.approx(2 / math.pi + 0.5 / 64, abs=0.02)
    per_position = masks.float().mean(dim=0)
    assert bool(((per_position - mean).abs() < 0.05).all())


def make_module(**kwargs) -> NestedMaskGITModule:
    torch.manual_seed(0)
    module = NestedMaskGITModule(model=MODEL, **kwargs)
    module.log = module.log_dict = lambda *args, **kw: None  # no trainer: nothing to log to
    return module


def record_forward(module: NestedMaskGITModule) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Record (tokens, labels, width) of every call of the module's transformer."""
    calls = []

    def hook(model, args, kwargs):
        calls.append((args[0].clone(), args[1].clone(), kwargs["width"]))

    module.model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def training_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(1)
    return torch.randint(0, 16, (size, 8), generator=data), torch.randint(0, 3, (size,), generator=data)


@pytest.mark.parametrize(("dropout", "null_share"), [(1.0, (1.0, 1.0)), (0.0, (0.0, 0.0)), (0.25, (0.18, 0.32))])
def test_training_drops_labels_to_the_null_class_per_item(dropout, null_share):
    """Catches label dropout removed, inverted (1 - p) or drawn once per batch: the model sees the null class for
    a share p of the items, and otherwise the true label."""
    module = make_module(label_dropout=dropout)
    calls = record_forward(module)
    tokens, labels = training_batch(400)
    module.training_step((tokens, labels), 0)
    assert len(calls) == 4
    seen = calls[0][1]
    null = seen == NULL
    assert null_share[0] <= null.float().mean().item() <= null_share[1]
    assert torch.equal(seen[~null], labels[~null])


def test_validation_keeps_the_labels():
    """Catches label dropout applied to the validation loss."""
    module = make_module(label_dropout=1.0)
    calls = record_forward(module)
    tokens, labels = training_batch(16)
    module.validation_step((tokens, labels), 0)
    assert all(torch.equal(seen, labels) for _, seen, _ in calls)


def test_every_width_trains_on_one_masking_of_the_batch():
    """Catches masking each width separately, or masked inputs that leak the ground truth: all widths see the same
    inputs, [MASK] at masked positions (at least one per item) and the true tokens elsewhere."""
    module = make_module()
    calls = record_forward(module)
    tokens, labels = training_batch(32)
    module.training_step((tokens, labels), 0)
    assert sorted(width for _, _, width in calls) == [1, 2, 4, 8]
    inputs = calls[0][0]
    assert all(torch.equal(seen, inputs) for seen, _, _ in calls)
    masked = inputs == 16
    assert bool(masked.any(dim=1).all()) and not bool(masked.all())
    assert torch.equal(inputs[~masked], tokens[~masked])


def test_each_width_distills_from_the_next_larger_width_on_masked_positions_only():
    """Catches a teacher that is the smaller width or always m_1, swapped alpha weights, and losses taken over
    unmasked positions: m_1: CE; m_p: alpha CE + (1 - alpha) CE(softmax(m_{p/2}) detached), on masked positions."""
    module = make_module(distill="progressive")
    tokens, labels = training_batch(6)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:, 1::3] = True
    inputs, alpha = tokens.masked_fill(mask, 16), 0.3
    losses = {p: loss.item() for p, (loss, _) in module.width_losses(inputs, tokens, mask, labels, alpha).items()}
    with torch.no_grad():
        logits = {p: module.model(inputs, labels, width=p)[mask] for p in (1, 2, 4, 8)}
    ce = {p: F.cross_entropy(logits[p], tokens[mask]).item() for p in logits}
    assert losses[1] == pytest.approx(ce[1], rel=1e-5)
    for p in (2, 4, 8):
        soft = -(F.softmax(logits[p // 2], -1) * F.log_softmax(logits[p], -1)).sum(-1).mean().item()
        assert losses[p] == pytest.approx(alpha * ce[p] + (1 - alpha) * soft, rel=1e-5), f"m_{p}"
    other_targets = torch.where(mask, tokens, (tokens + 1) % 16)  # ground truth changed at unmasked positions only
    again = {p: loss.item() for p, (loss, _) in module.width_losses(inputs, other_targets, mask, labels, alpha).items()}
    assert again == pytest.approx(losses, rel=1e-6)


def test_training_step_weights_ground_truth_by_alpha_of_the_global_step(monkeypatch):
    """Catches a training step that ignores alpha's decay or inverts it: its loss is ``width_losses`` at
    alpha(global step), i.e. ground truth only at step 0 and soft targets only at the end of the decay."""
    module = make_module(distill="progressive", alpha_decay_steps=10)
    with torch.no_grad():  # confident predictions, so soft targets and ground truth give clearly different losses
        for param in module.model.parameters():
            param.normal_(0.0, 0.5)
    calls = record_forward(module)
    tokens, labels = training_batch(16)
    for step, alpha in ((0, 1.0), (10, 0.0)):
        monkeypatch.setattr(NestedMaskGITModule, "global_step", property(lambda self, step=step: step))
        calls.clear()
        total = module.training_step((tokens, labels), 0).item()
        inputs, seen = calls[0][:2]
        with torch.no_grad():
            expected = {
                a: sum(loss.item() for loss, _ in module.width_losses(inputs, tokens, inputs == 16, seen, a).values())
                for a in (0.0, 1.0)
            }
        assert expected[0.0] != pytest.approx(expected[1.0], rel=0.05)
        assert total == pytest.approx(expected[alpha], rel=1e-5), f"step {step}"


# --- evaluation ---------------------------------------------------------------------------------------------


def test_evaluation_labels_cycle_through_every_class():
    """Catches evaluation samples that all ask for one class (or any unbalanced draw): 0, 1, ..., C-1, 0, 1, ..."""
    labels = balanced_labels(23, 10)
    assert labels.tolist() == [i % 10 for i in range(23)]
    counts = torch.bincount(balanced_labels(1003, 7), minlength=7)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 1003
