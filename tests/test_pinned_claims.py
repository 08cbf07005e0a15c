"""Behaviour pins for the claims' statistics that the rest of the suite left loose (see tools/mutate.py).

Each test fails on one plausible bug, named in its docstring as the mutant of ``tools/mutate.py`` it kills, with
the standard errors and ratios worked out by hand from the seeds' values.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from magnets.claims import Measured, claims_table, standard_error
from magnets.results import RESULT_COLUMNS


def seed_rows(schedule: str, cache: str, fids: list[float], gflops: float, widths: str) -> list[dict]:
    """One results row per seed (seed = its index) of one configuration of the progressively distilled model."""
    rows = []
    for seed, fid in enumerate(fids):
        row = dict.fromkeys(RESULT_COLUMNS, "")
        row |= {
            "experiment": "pinned", "checkpoint": "/runs/progressive/checkpoints/last.ckpt", "distill": "progressive",
            "task": "class_cond", "schedule": schedule, "cache": cache, "guidance": 0.0, "samples": 1000,
            "extractor": "inception_offline", "seed": seed, "n_seeds": 1, "fid": fid, "rfid": 2.0,
            "gflops_per_sample": gflops, "widths": widths,
        }  # fmt: skip
        rows.append(row)
    return rows


def claim_a(candidate_fids: list[float], candidate_gflops: float, baseline_fids: list[float], baseline_gflops: float):
    rows = [
        *seed_rows("maskgit_12", "none", baseline_fids, baseline_gflops, "1"),
        *seed_rows("magnets_3333", "refresh_on_switch", candidate_fids, candidate_gflops, "8-4-2-1"),
    ]
    table = claims_table(pd.DataFrame(rows))
    return table[table["claim"] == "a"].iloc[0]


def test_claim_a_standard_error_scales_the_baseline_std_by_the_margin():
    """Kills ``claims_se_factor_not_squared`` (1.1 sigma_b^2 instead of (1.1 sigma_b)^2). Claim (a) compares the
    candidate with 1.1 x the baseline, whose standard deviation is then 1.1 sigma_b: with sigma_c = 0.5, sigma_b = 2
    and four seeds each, SE = sqrt(0.25 / 4 + 2.2^2 / 4) = sqrt(1.2725)."""
    candidate = Measured(mean=10.0, std=0.5, n=4, gflops=0.4, rfid=2.0, checkpoint="c")
    baseline = Measured(mean=10.0, std=2.0, n=4, gflops=1.2, rfid=2.0, checkpoint="b")
    assert standard_error(candidate, baseline, 1.1) == pytest.approx(math.sqrt(1.2725))
    assert standard_error(candidate, baseline) == pytest.approx(math.sqrt(0.25 / 4 + 4.0 / 4))


def test_claim_a_verdict_uses_the_scaled_standard_error():
    """Kills ``claims_se_factor_not_squared`` through the verdict. Baseline seeds 7, 10, 13 (mean 10, std 3),
    candidate seeds 14.6, 14.7, 14.8 (mean 14.7, std 0.1): the excess over 1.1 x 10 is 3.7 and
    2 SE = 2 sqrt(0.01 / 3 + 3.3^2 / 3) = 3.81, so the claim is not resolved (with 1.1 x 3^2 it would be 3.64: fails)."""
    row = claim_a([14.6, 14.7, 14.8], 0.4, [7.0, 10.0, 13.0], 1.2)
    assert row["verdict"] == "not resolved"
    two_se = 2 * math.sqrt(0.1**2 / 3 + (1.1 * 3.0) ** 2 / 3)
    assert f"({two_se:.2f})" in row["why"] and f"{two_se:.2f}" == "3.81"


def test_claim_a_accepts_exactly_the_required_gflops_ratio():
    """Kills ``claims_gflops_ratio_inclusive``: 'at >= 2.5x fewer GFLOPs' holds at exactly 2.5x (5 GFLOPs against 2,
    exact in binary floating point) and fails just under it."""
    at_ratio = claim_a([10.0, 10.1, 10.2], 2.0, [10.0, 10.1, 10.2], 5.0)
    assert "2.50x fewer GFLOPs" in at_ratio["why"]
    assert at_ratio["verdict"] == "holds"  # 10.1 is under 1.1 x 10.1 by 1.01, far more than 2 SE (0.17)
    under = claim_a([10.0, 10.1, 10.2], 2.0, [10.0, 10.1, 10.2], 4.96)
    assert under["verdict"] == "fails" and "below 2.5x" in under["why"]
