"""magnets.evaluate over several seeds: a row per seed plus mean and std rows, resumable per seed, the tokenizer's rFID in
every row, and the objectives a Hydra sweeper optimises."""

import csv
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import magnets.evaluate as evaluate_module
import magnets.evaluation as evaluation_module
from conftest import CONF_DIR
from magnets.cli import evaluation_seeds
from magnets.errors import ConfigError
from magnets.evaluate import check_config, evaluate
from magnets.pipeline import train
from magnets.results import RESULT_COLUMNS, SEED_METRICS, objectives


def compose_evaluate(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "seeds"),
    [
        ([], [0]),
        (["seed=7"], [7]),
        (["repeats=3", "seed=5"], [5, 6, 7]),
        (["seeds=[3,1,4]"], [3, 1, 4]),
        (["seeds=[3,1,4]", "repeats=3"], [3, 1, 4]),  # consistent: seeds wins
    ],
)
def test_seeds_from_config(overrides: list[str], seeds: list[int]) -> None:
    assert evaluation_seeds(compose_evaluate(overrides)) == seeds


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["seeds=[0,1]", "repeats=3"], "repeats=3 is not valid; valid: null or 2, the number of seeds=[0, 1]"),
        (["repeats=0"], "repeats=0 is not valid; valid: a positive integer"),
        (["seeds=[]"], "seeds=[] is not valid; valid: null or a non-empty list of distinct integers"),
        (["seeds=[1,1]"], "seeds=[1, 1] is not valid; valid: null or a non-empty list of distinct integers"),
        (["seeds=[a]"], "seeds=['a'] is not valid"),
        (["rfid=maybe"], "rfid='maybe' is not valid; valid: True, False"),
    ],
)
def test_inconsistent_seeds_are_refused(overrides: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        check_config(compose_evaluate(overrides))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_three_seeds_write_seed_rows_mean_std_and_rfid(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_cfg.classifier.epochs = 4  # features that tell the seeds' samples apart at the rows' 4 decimals (1 epoch: not)
    train(tiny_cfg)
    runs = tiny_cfg.paths.runs
    overrides = [f"paths.runs={runs}", "samples=30", "chunk_size=16", "batch_size=16", "reference.count=40",
                 "extractor=fmnist_classifier", f"classifier={tiny_cfg.classifier.path}", "seeds=[0,1,2]"]  # fmt: skip
    cfg = compose_evaluate(overrides)
    summary = evaluate(cfg)
    rows = read_rows(Path(runs, "fmnist", "results.csv"))
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert [(r["seed"], r["aggregate"], r["n_seeds"]) for r in rows] == [
        ("0", "", "1"), ("1", "", "1"), ("2", "", "1"), ("", "mean", "3"), ("", "std", "3"),
    ]  # fmt: skip
    seeds, mean, std = rows[:3], rows[3], rows[4]
    fids = [float(r["fid"]) for r in seeds]
    assert len(set(fids)) == 3  # each seed its own samples
    for column in SEED_METRICS:
        if seeds[0][column] == "":
            assert mean[column] == std[column] == "", column
            continue
        values = np.array([float(r[column]) for r in seeds])
        assert float(mean[column]) == pytest.approx(np.mean(values), abs=1e-6), column
        assert float(std[column]) == pytest.approx(np.std(values, ddof=1), abs=1e-6), column
    assert mean["fvd"] == "" and mean["grid"] == "" and all(Path(runs, "fmnist", r["grid"]).is_file() for r in seeds)
    assert {r["schedule"] for r in rows} == {"magnets_3333"} and {r["reference"] for r in rows} == {"test-40"}

    # rFID: the same tokenizer and reference in every seed row, the mean its value, std 0; below the tiny model's FID.
    rfid = float(seeds[0]["rfid"])
    assert all(float(r["rfid"]) == rfid for r in [*seeds, mean]) and float(std["rfid"]) == 0.0
    assert np.isfinite(rfid) and 0 <= rfid < min(fids)
    (cached,) = Path(runs, "fid_stats").glob("rfid__*__fmnist_classifier__*__test-40__test-40.json")

    # A rerun (through the Hydra entry point) decodes nothing: every seed's chunks are on disk.
    folders = sorted(p for p in Path(runs, "fmnist", "samples_cache").iterdir() if p.is_dir())
    assert len(folders) == 3  # the seed is part of the chunk key
    decoded = []
    original = evaluation_module.generate_samples
    monkeypatch.setattr(evaluation_module, "generate_samples", lambda *a, **k: decoded.append(1) or original(*a, **k))
    frechet, gflops = evaluate_module.main(cfg)  # Hydra's main passes a given config through
    assert decoded == []
    assert (frechet, gflops) == objectives(summary) == (float(mean["fid"]), float(mean["gflops_per_sample"]))
    assert summary["aggregate"] == "mean"
    again = read_rows(Path(runs, "fmnist", "results.csv"))[5:]
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]  # the same samples, the same rows
