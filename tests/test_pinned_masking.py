"""Behaviour pins for the mask schedules that the rest of the suite left loose (see tools/mutate.py).

Each test fails on one plausible bug, named in its docstring as the mutant of ``tools/mutate.py`` it kills, and
checks values worked out by hand.
"""

from __future__ import annotations

import math

import pytest

from magnets.masking import decode_masked_counts, mask_ratio


def test_every_schedule_at_an_interior_point_by_hand():
    """Kills ``masking_square_root_is_square`` (1 - r^2 for square_root): the endpoints and monotonicity the other
    tests check hold for both variants, the interior values do not. At r = 1/4: cosine cos(pi/8), linear 3/4,
    square_root 1 - 1/2, arccos acos(1/4) / (pi/2); at r = 1/2: arccos gives (pi/3) / (pi/2) = 2/3."""
    assert mask_ratio(0.25, "square_root") == pytest.approx(0.5)
    assert mask_ratio(0.64, "square_root") == pytest.approx(0.2)
    assert mask_ratio(0.25, "linear") == pytest.approx(0.75)
    assert mask_ratio(0.25, "cosine") == pytest.approx(0.9238795325112867)  # cos(22.5 degrees)
    assert mask_ratio(0.5, "arccos") == pytest.approx(2 / 3)
    assert mask_ratio(0.25, "arccos") == pytest.approx(math.acos(0.25) * 2 / math.pi)


def test_square_root_decode_counts_by_hand():
    """Kills ``masking_square_root_is_square`` through the decode: 16 tokens over 4 steps leave
    floor(16 (1 - sqrt(k/4))) masked after step k-1: 8, floor(4.69) = 4, floor(2.14) = 2, then 0 (1 - r^2 would
    leave 15, 12, 7, 0)."""
    assert decode_masked_counts(16, 4, "square_root") == [8, 4, 2, 0]
    assert decode_masked_counts(16, 4, "linear") == [12, 8, 4, 0]
