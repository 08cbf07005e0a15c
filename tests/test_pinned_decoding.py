"""Behaviour pins for decoding that the rest of the suite left loose (see tools/mutate.py).

Each test fails on one plausible bug, named in its docstring as the mutant of ``tools/mutate.py`` it kills, and
checks a value worked out by hand (a closed form or exact arithmetic), not one the code under test produced.
Decodes run through a stub tokens-to-logits callable whose logits are fixed per grid position.
"""

from __future__ import annotations

import pytest
import torch

from magnets.decoding.loop import SamplingSettings, decode
from magnets.decoding.plan import StepWork, check_cache_mode, plan_decode
from magnets.decoding.policies import RouteSettings

NULL = 7  # the null class of the stub decodes (no row of these tests is unconditional unless guided)


class FixedLogits:
    """Tokens-to-logits stub: a masked position ``p`` gets ``cond[p]`` (``[N, V]``), or ``uncond[p]`` in a row whose
    label is the null class, returned in ``dtype`` (as a reduced-precision model would return them)."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.cond, self.uncond, self.dtype = cond, cond if uncond is None else uncond, dtype
        self.mask_id = cond.shape[1]

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, width: int, step: int) -> tuple[torch.Tensor, StepWork]:
        positions = (tokens == self.mask_id).nonzero()[:, 1].view(tokens.shape[0], -1)  # [B, M], ascending
        null = (labels == NULL)[:, None, None]
        logits = torch.where(null, self.uncond[positions], self.cond[positions]).to(self.dtype)  # [B, M, V]
        n = tokens.shape[1]
        return logits, StepWork(width, "full", queries=n, keys=n, head_positions=positions.shape[1], rows=tokens.shape[0])


def decode_stub(stub: FixedLogits, rows: int, steps: int, settings: SamplingSettings, seed: int = 0):
    tokens = torch.full((rows, stub.cond.shape[0]), stub.mask_id)
    return decode(
        stub, tokens, torch.zeros(rows, dtype=torch.long), [1] * steps, settings, mask_id=stub.mask_id, null_class=NULL,
        generator=torch.Generator().manual_seed(seed), keep_history=True,
    )  # fmt: skip


def test_reduced_precision_logits_are_combined_and_sampled_in_float32():
    """Kills ``loop_no_float32_upcast`` (guidance and softmax in the model's bf16).

    Guidance w = 100 on bf16 logits of one token over two codes. In float32 the guided logits are
    code 0: 101 * 1024 - 100 * 1020 = 1424 and code 1: 101 * 1480 - 100 * 1480 = 1480, so code 1 wins by 56
    (112 nats at temperature 0.5). In bf16 arithmetic (8 significant bits) the products round to 103424 - 101888 =
    1536 and 149504 - 148480 = 1024, and code 0 would win.
    """
    cond, uncond = torch.tensor([[1024.0, 1480.0]]), torch.tensor([[1020.0, 1480.0]])  # [N=1, V=2]
    assert torch.equal(cond.bfloat16().float(), cond) and torch.equal(uncond.bfloat16().float(), uncond)  # exact in bf16
    settings = SamplingSettings(guidance_scale=100.0)
    for dtype in (torch.float32, torch.bfloat16):
        result = decode_stub(FixedLogits(cond, uncond, dtype=dtype), rows=4, steps=1, settings=settings)
        assert result.tokens.tolist() == [[1]] * 4, f"{dtype} logits"


def test_temperature_zero_is_refused():
    """Kills ``loop_temperature_zero_accepted``: temperature 0 would divide the last step's logits by zero."""
    with pytest.raises(ValueError, match=r"need temperature > 0 and temperature_anneal >= 0, got 0.0, 0.8"):
        SamplingSettings(temperature=0.0)
    with pytest.raises(ValueError, match="need temperature > 0"):
        SamplingSettings(temperature=-0.5)
    assert SamplingSettings(temperature=1e-3).sampling_temperature(step=3, steps=4) == pytest.approx(1e-3)


def test_refresh_every_must_be_at_least_one_step():
    """Kills ``plan_refresh_every_zero_accepted``: refresh_every 0 is refused, 1 (refresh every step) is the least."""
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"refresh_every must be a positive number of steps, got {bad}"):
            check_cache_mode("refresh_every_n", bad)
    with pytest.raises(ValueError, match="positive number of steps, got 0"):
        plan_decode(16, [1, 1, 1], "refresh_every_n", refresh_every=0)
    check_cache_mode("refresh_every_n", 1)
    assert [s.kind for s in plan_decode(16, [1, 1, 1], "refresh_every_n", refresh_every=1).steps] == ["refresh"] * 3


def test_route_fraction_zero_is_refused():
    """Kills ``policies_fraction_zero_accepted``: the confident share lies in (0, 1]; 0 is refused, 1 accepted."""
    with pytest.raises(ValueError, match=r"route fraction must lie in \(0, 1\], got 0.0"):
        RouteSettings("confidence", fraction=0.0)
    with pytest.raises(ValueError, match=r"route fraction must lie in \(0, 1\], got 1.5"):
        RouteSettings("confidence", fraction=1.5)
    assert RouteSettings("confidence", fraction=1.0).fraction == 1.0
