"""The one home of mask-ratio math, for training and for decoding.

A mask schedule maps progress ``r`` in ``[0, 1]`` to the fraction of tokens
still masked: 1 at ``r = 0``, 0 at ``r = 1``.
"""

from __future__ import annotations

import math

import torch

MASK_SCHEDULES = {
    "cosine": lambda r: math.cos(r * math.pi / 2),
    "linear": lambda r: 1.0 - r,
    "square_root": lambda r: 1.0 - math.sqrt(r),
    "arccos": lambda r: math.acos(r) / (math.pi / 2),
}


def mask_ratio(progress: float, schedule: str = "cosine") -> float:
    """Fraction of tokens masked at ``progress`` in ``[0, 1]`` under ``schedule``."""
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"unknown mask schedule {schedule!r}; valid: {sorted(MASK_SCHEDULES)}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    return MASK_SCHEDULES[schedule](progress)


def random_training_mask(
    batch_size: int,
    num_tokens: int,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask ``[B, N]`` (True = masked) for one training batch.

    Each item draws ``r ~ U[0, 1)`` and masks ``ceil(mask_ratio(r) * M)``
    random positions, at least one, among the ``M`` positions that
    ``maskable`` ``[N]`` allows (default: all N). Positions it forbids
    (frame prediction's given tokens) are never masked.
    """
    if maskable is None:
        maskable = torch.ones(num_tokens, dtype=torch.bool, device=device)
    if maskable.shape != (num_tokens,) or not bool(maskable.any()):
        raise ValueError(f"maskable must be a bool [N={num_tokens}] with at least one True, got shape {list(maskable.shape)}")
    choices = int(maskable.sum())
    progress = torch.rand(batch_size, generator=generator, device=device).tolist()
    counts = torch.tensor([min(choices, max(1, math.ceil(mask_ratio(r, schedule) * choices))) for r in progress], device=device)
    scores = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    scores = scores.masked_fill(~maskable.to(device), 2.0)  # above every uniform score: ranked after all maskable positions
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, N]: each position's rank among the scores
    return ranks < counts[:, None]


def decode_masked_counts(num_masked: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens still masked after each of ``steps`` decode steps that start with ``num_masked`` masked.

    MaskGIT's rule: after step ``k`` (0-based), ``floor(num_masked *
    mask_ratio((k + 1) / steps))`` tokens stay masked, clamped so that every
    step reveals at least one token and leaves at least one for each later
    step; the last step reveals all that are left. The counts are the same for
    every sample, so a batch decodes in lockstep.
    """
    if steps < 1:
        raise ValueError(f"decoding needs at least one step, got steps={steps}")
    if num_masked < steps:
        raise ValueError(
            f"{num_masked} masked tokens cannot be revealed over {steps} steps (each step reveals at least one): "
            f"use at most {num_masked} steps"
        )
    counts, masked = [], num_masked
    for k in range(steps):
        later_steps = steps - 1 - k
        target = math.floor(num_masked * mask_ratio((k + 1) / steps, schedule))
        masked = min(masked - 1, max(later_steps, target))
        counts.append(masked)
    return counts
