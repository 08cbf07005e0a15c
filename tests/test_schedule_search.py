"""The schedule search: cut points always give a valid K-step schedule, and the Optuna preset runs trials of evaluate."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from magnets.data import fashion_mnist
from magnets.decoding.schedules import ModelSchedule, steps_from_cuts
from magnets.pipeline import train


@pytest.mark.parametrize("total_steps", [1, 4, 12])
def test_every_choice_of_cuts_is_a_valid_schedule_of_exactly_k_steps(total_steps):
    seen = set()
    for cuts in itertools.product(range(-1, total_steps + 2), repeat=3):  # out-of-range cuts are clamped
        steps = steps_from_cuts(total_steps, *cuts)
        assert len(steps) == 4 and sum(steps) == total_steps and min(steps) >= 0 and steps[-1] >= 1
        ModelSchedule("s", (8, 4, 2, 1), tuple(steps))  # valid
        seen.add(tuple(steps))
    # Every split of K steps with at least one at full width is reachable: the search space is the whole family.
    every = {s for s in itertools.product(range(total_steps + 1), repeat=4) if sum(s) == total_steps and s[-1] >= 1}
    assert seen == every
    assert steps_from_cuts(12, 3, 6, 9) == [3, 3, 3, 3] and steps_from_cuts(12, 0, 0, 0) == [0, 0, 0, 12]


def test_the_optuna_preset_runs_two_trials_of_evaluate_on_the_tiny_run(tiny_cfg, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    train(tiny_cfg)
    runs, sweep = Path(tiny_cfg.paths.runs), tmp_path / "search"
    args = [
        "magnets.evaluate", "name=fmnist", "+sweep=schedule_search", "hydra.sweeper.n_trials=2", "samples=20",
        "batch_size=10", "reference.count=40", f"paths.runs={runs}", f"classifier={tiny_cfg.classifier.path}",
        f"hydra.sweep.dir={sweep}", "schedule.total_steps=choice(3,4)",  # K searched too, as the README says
    ]  # fmt: skip
    env = {**os.environ, "TEST_PAYLOAD_SHA256": json.dumps(fashion_mnist.PAYLOAD_SHA256), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("entry.py")
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    with open(runs / "fmnist" / "results.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if not row.get("aggregate")]
    assert len(rows) == 2 and all(row["schedule"].startswith("search_") for row in rows)
    orders = {"8-4-2-1": "", "1-2-4-8": "down_", "8-2-1-4": "sandwich_"}  # the order is searched too
    for row in rows:
        steps = [int(k) for k in row["steps_per_width"].split("-")]
        assert sum(steps) in (3, 4) and row["steps"] == str(sum(steps))
        assert row["schedule"] == "search_" + orders[row["widths"]] + "-".join(map(str, steps))
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert front["name"] == "optuna" and front["solutions"]  # Optuna's Pareto front of (FID, GFLOPs)
    objectives = {(round(float(r["fid"]), 3), round(float(r["gflops_per_sample"]), 5)) for r in rows}
    assert {(round(s["values"][0], 3), round(s["values"][1], 5)) for s in front["solutions"]} <= objectives


def test_search_orders_name_their_widths():
    from omegaconf import OmegaConf

    from magnets.decoding.schedules import SCHEDULE_DIR, load_schedule, schedule_order, searched_schedule_name

    assert searched_schedule_name(3, 0, 1, 2) == "search_0-1-1-1"
    assert searched_schedule_name(3, 0, 1, 2, order="down") == "search_down_0-1-1-1"
    template = OmegaConf.load(SCHEDULE_DIR / "search.yaml")
    template.merge_with({"order": "sandwich", "total_steps": 4, "cut_1": 1, "cut_2": 1, "cut_3": 2})
    schedule = load_schedule(OmegaConf.to_container(template, resolve=True))
    assert (schedule.name, schedule.widths, schedule.steps) == ("search_sandwich_1-0-1-2", (8, 2, 1, 4), (1, 0, 1, 2))
    assert schedule.width_per_step([8, 4, 2, 1]) == [8, 1, 4, 4]
    with pytest.raises(ValueError, match=r"unknown schedule order 'zigzag'; valid: \['up', 'down', 'sandwich'\]"):
        schedule_order("zigzag")
