"""magnets.evaluate: result rows appended safely by parallel jobs; an end-to-end evaluation on a tiny trained run.

The paper protocol (reference files, Inception Score, resumable chunks) is tested in test_fid_protocol.py."""

import csv
import json
import multiprocessing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR
from magnets.cli import check_evaluate_config
from magnets.errors import ConfigError
from magnets.evaluate import evaluate
from magnets.pipeline import train
from magnets.results import RESULT_COLUMNS, append_result


def row(i: int) -> dict:
    return {column: f"{column}-{i}" for column in RESULT_COLUMNS} | {"fid": i, "grid": "grids/a, b.png"}


def append_many(path, start, count):
    for i in range(start, start + count):
        append_result(path, row(i))


def test_parallel_appends_keep_one_header_and_every_row(tmp_path):
    path = tmp_path / "results.csv"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=append_many, args=(path, 50 * k, 50)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and sorted(int(r["fid"]) for r in rows) == list(range(200))
    assert all(r["grid"] == "grids/a, b.png" for r in rows)  # quoted comma survives
    assert path.read_text().count("experiment,checkpoint") == 1


def test_append_refuses_wrong_columns_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="needs exactly the columns"):
        append_result(tmp_path / "r.csv", {"fid": 1})
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"has columns \['a', 'b'\]"):
        append_result(tmp_path / "other.csv", row(0))
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"


def test_evaluate_appends_a_row_with_fid_accuracy_gflops_and_a_grid(tiny_cfg, tmp_path):
    train(tiny_cfg)
    runs = tiny_cfg.paths.runs
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [f"paths.runs={runs}", "samples=30", "batch_size=16", "reference.count=40", "extractor=fmnist_classifier",
                f"classifier={tiny_cfg.classifier.path}"]  # fmt: skip
        cached = evaluate(compose("evaluate", overrides=[*base, "schedule=magnets_3333"]))
        baseline = evaluate(compose("evaluate", overrides=[*base, "schedule=maskgit_12", "decode.cache=none"]))
    with open(f"{runs}/fmnist/results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["schedule"] for r in rows] == ["magnets_3333", "maskgit_12"]
    assert rows[0]["cache"] == "refresh_on_switch" and rows[0]["distill"] == "progressive" and rows[0]["samples"] == "30"
    assert float(rows[0]["fid"]) >= 0 and 0 <= float(rows[0]["class_acc"]) <= 1
    assert 1 <= float(rows[0]["inception_score"]) <= 10 and float(rows[0]["inception_score_std"]) >= 0  # classifier logits
    assert rows[0]["reference"] == "test-40"
    assert [(r["seed"], r["aggregate"], r["n_seeds"]) for r in rows] == [("0", "", "1")] * 2  # one seed: no mean, std rows
    assert rows[0]["rfid"] == rows[1]["rfid"] and float(rows[0]["rfid"]) >= 0  # one tokenizer, one reference
    assert cached["gflops_per_sample"] < baseline["gflops_per_sample"]
    assert (tmp_path / "runs" / "fmnist" / rows[0]["grid"]).is_file()
    assert rows[0]["git_commit"] != ""


def test_evaluate_decodes_in_bfloat16_and_runs_without_a_classifier(tiny_cfg, tmp_path):
    train(tiny_cfg)
    runs = tiny_cfg.paths.runs
    Path(tiny_cfg.classifier.path).unlink()  # a run with no project classifier (as ImageNet's): no class accuracy
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # rfid=false: rFID is tested in test_seeds.py; here it would cost another Inception pass
        base = [f"paths.runs={runs}", "samples=20", "batch_size=10", "reference.count=40", "extractor=inception_offline",
                "rfid=false"]  # fmt: skip
        fp32 = evaluate(compose("evaluate", overrides=base))
        bf16 = evaluate(compose("evaluate", overrides=[*base, "dtype=bfloat16"]))
        with pytest.raises(ConfigError, match=r"dtype='int8' is not valid; valid: float32, bfloat16, float16"):
            check_evaluate_config(compose("evaluate", overrides=[*base, "dtype=int8"]))
    assert fp32["class_acc"] == bf16["class_acc"] == "" and fp32["rfid"] == ""
    assert bf16["fid"] > 0 and bf16["gflops_per_sample"] == fp32["gflops_per_sample"]
    folders = sorted(p for p in Path(runs, "fmnist", "samples_cache").iterdir() if p.is_dir())
    assert len(folders) == 2  # the dtype is part of what determines the samples
    dtypes = {json.loads((folder / "settings.json").read_text())["dtype"] for folder in folders}
    assert dtypes == {"float32", "bfloat16"}


def test_decode_policies_run_from_hydra_and_are_named_in_the_row(tiny_cfg, tmp_path):
    """decode_policy=<file> sets a schedule and a policy: its row says which, its GFLOPs are its own; bad values refused."""
    train(tiny_cfg)
    runs = tiny_cfg.paths.runs
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [f"paths.runs={runs}", "samples=20", "batch_size=10", "reference.count=40", "extractor=fmnist_classifier",
                f"classifier={tiny_cfg.classifier.path}", "rfid=false"]  # fmt: skip
        plain = evaluate(compose("evaluate", overrides=[*base, "schedule=maskgit_4"]))
        routed = evaluate(compose("evaluate", overrides=[*base, "decode_policy=route_confidence_4_m8"]))
        guided = evaluate(compose("evaluate", overrides=[*base, "decode_policy=guided_4_narrow"]))
        partial = evaluate(compose("evaluate", overrides=[*base, "decode_policy=partial_3333_top2", "decode.refresh_layer=1"]))
        with pytest.raises(ConfigError, match=r"decode.fast=True is not valid; valid: false with a decode policy"):
            check_evaluate_config(compose("evaluate", overrides=[*base, "decode_policy=route_context_4_m8", "decode.fast=true"]))
        with pytest.raises(ConfigError, match=r"decode.refresh_layer=9 is not valid; valid: a layer in 0..2"):
            evaluate(compose("evaluate", overrides=[*base, "decode_policy=partial_3333_top2", "decode.refresh_layer=9"]))
    with open(f"{runs}/fmnist/results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["cache"], r["policy"], r["guidance"]) for r in rows] == [
        ("maskgit_4", "refresh_on_switch", "", "0.0"),
        ("maskgit_4", "refresh_on_switch", "route=confidence:8:0.5", "0.0"),
        ("maskgit_4", "refresh_on_switch", "guidance_width=8", "1.0"),
        ("magnets_3333", "refresh_from_layer", "refresh_layer=1", "0.0"),
    ]
    assert routed["gflops_per_sample"] < plain["gflops_per_sample"] < guided["gflops_per_sample"] < 2 * plain["gflops_per_sample"]
    assert partial["fid"] > 0 and "route-confidence-8-0.5" in rows[1]["grid"]
