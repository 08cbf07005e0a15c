"""Provenance: every artifact says what produced it, and nothing made from something else is reused or paired silently.

The three silent paths this guards (each reproduced on the tiny fixture, then shown refused): a transformer decoded or
resumed with another tokenizer than the one its tokens came from; a smoke run's tokenizer or classifier reused by a
later full run; two trainings of one experiment started together sharing a run folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO, tiny_overrides
from magnets.claims import claims_table, read_results
from magnets.data import fashion_mnist
from magnets.errors import MismatchError
from magnets.evaluate import evaluate
from magnets.files import file_sha256
from magnets.pipeline import fit_classifier_stage, train
from magnets.provenance import (
    check_same_key,
    check_tokenizer_identity,
    classifier_training_key,
    data_selection,
    identity,
    key_differences,
    split_identity,
    tokenizer_training_key,
)
from magnets.results import RESULT_COLUMNS, append_result
from magnets.runs import resolve_checkpoint, run_lock
from magnets.sample import sample

# --- the records and checks themselves -------------------------------------------------------------------------------


def test_key_differences_name_every_nested_field_with_both_values() -> None:
    saved = {"data": {"module": {"subset": 512, "image_size": 32}}, "classifier": {"epochs": 1, "seed": 0}}
    current = {"data": {"module": {"subset": None, "image_size": 32}}, "classifier": {"epochs": 4, "seed": 0}, "new": 1}
    assert key_differences(saved, current) == [
        ("classifier.epochs", 1, 4), ("data.module.subset", 512, None), ("new", None, 1),
    ]  # fmt: skip
    assert key_differences(saved, saved) == []
    with pytest.raises(MismatchError, match=r"^classifier c.pt was trained with other settings \(classifier.epochs: saved 1, "
                       r"now 4; data.module.subset: saved 512, now None; new: saved None, now 1\): retrain$"):  # fmt: skip
        check_same_key("classifier", Path("c.pt"), saved, current, "retrain")
    with pytest.raises(MismatchError, match=r"^classifier c.pt records no training settings"):
        check_same_key("classifier", Path("c.pt"), None, current, "retrain")


def test_training_keys_leave_out_where_the_files_are_and_keep_what_selects_them() -> None:
    data = {"name": "fmnist", "num_classes": 10, "module": {"root": "/a", "search_debian": True, "num_workers": 2,
            "download_url": "http://x/", "subset": 512, "val_size": 5000, "batch_size": 128}}  # fmt: skip
    moved = data | {"module": data["module"] | {"root": "/b", "num_workers": 0, "search_debian": False}}
    assert data_selection(data) == data_selection(moved)
    assert data_selection(data)["module"] == {"subset": 512, "val_size": 5000, "batch_size": 128}
    run = {"data": data, "seed": 7, "classifier": {"epochs": 4, "batch_size": 128, "seed": 0, "path": "x.pt"},
           "tokenizer": {"kind": "vq2d", "model": {"codebook_size": 64}, "optim": {"lr": 1}, "codebook": {},
                         "trainer": {"max_steps": 4}, "seed": 0, "dir": "d", "name": "n"}}  # fmt: skip
    # The run's own seed and the output paths are not part of either key: a seed sweep shares both stages' outputs.
    other_seed = run | {
        "seed": 8,
        "classifier": run["classifier"] | {"path": "y.pt"},
        "tokenizer": run["tokenizer"] | {"dir": "e"},
    }
    assert classifier_training_key(run) == classifier_training_key(other_seed)
    assert tokenizer_training_key(run) == tokenizer_training_key(other_seed)
    smoke = run | {"data": data | {"module": data["module"] | {"subset": 64}}}
    assert [f for f, _, _ in key_differences(classifier_training_key(run), classifier_training_key(smoke))] == [
        "data.module.subset"
    ]
    # A tokenizer saved before tokenizer.seed existed was seeded with the run's seed, which its config records.
    older = run | {"seed": 0, "tokenizer": {k: v for k, v in run["tokenizer"].items() if k != "seed"}}
    assert tokenizer_training_key(older) == tokenizer_training_key(run)
    assert key_differences(tokenizer_training_key(older | {"seed": 3}), tokenizer_training_key(run)) == [("tokenizer.seed", 3, 0)]
    shorter = run | {"tokenizer": run["tokenizer"] | {"trainer": {"max_steps": 1}}}
    assert [f for f, _, _ in key_differences(tokenizer_training_key(run), tokenizer_training_key(shorter))] == [
        "tokenizer.trainer.max_steps"
    ]


def test_tokenizer_identity_matches_is_refused_or_overridden_and_says_which(tmp_path) -> None:
    tokenizer, other = tmp_path / "tokenizer.ckpt", tmp_path / "other.ckpt"
    tokenizer.write_bytes(b"codes A")
    other.write_bytes(b"codes B")
    recorded = file_sha256(tokenizer)
    assert identity(tokenizer) == recorded[:16] and identity(other) != identity(tokenizer)
    assert check_tokenizer_identity(recorded, tokenizer, Path("run.ckpt"), False) == (identity(tokenizer), "match")
    assert check_tokenizer_identity(None, other, Path("run.ckpt"), False) == (identity(other), "unrecorded")
    assert check_tokenizer_identity(recorded, other, Path("run.ckpt"), True) == (identity(other), "override")
    message = (
        rf"^tokenizer {other} \(sha256 {identity(other)}\) is not the one run.ckpt was trained on \(sha256 {recorded[:16]}\)"
    )
    with pytest.raises(MismatchError, match=message):
        check_tokenizer_identity(recorded, other, Path("run.ckpt"), False)


def test_a_rewritten_shard_gives_the_split_a_new_identity(tmp_path) -> None:
    for index in range(2):
        (tmp_path / f"shard-0000{index}").mkdir()
        (tmp_path / f"shard-0000{index}" / "meta.json").write_text(json.dumps({"created": "t0", "index": index}))
    before = split_identity(tmp_path)
    assert split_identity(tmp_path) == before and len(before) == 16
    (tmp_path / "shard-00001" / "meta.json").write_text(json.dumps({"created": "t1", "index": 1}))
    assert split_identity(tmp_path) != before


def test_a_results_file_of_an_earlier_version_gains_the_provenance_columns_and_keeps_its_rows(tmp_path) -> None:
    old_columns = [c for c in RESULT_COLUMNS if not c.endswith("_sha256") and c != "tokenizer_check"]
    path = tmp_path / "results.csv"
    path.write_text(",".join(old_columns) + "\n" + ",".join(f"old-{c}" for c in old_columns) + "\n")
    append_result(path, {column: f"new-{column}" for column in RESULT_COLUMNS})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert rows[0]["fid"] == "old-fid" and rows[0]["tokenizer_sha256"] == "" and rows[0]["tokenizer_check"] == ""
    assert rows[1]["tokenizer_sha256"] == "new-tokenizer_sha256"
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("fid,mystery\n1,2\n")
    with pytest.raises(ValueError, match=r"unknown: \['mystery'\]"):
        append_result(foreign, {column: "x" for column in RESULT_COLUMNS})
    assert foreign.read_text() == "fid,mystery\n1,2\n"


def claim_rows(tokenizers: list[str], extractors: list[str], checks: list[str]) -> pd.DataFrame:
    """Seed rows of magnets_3333 and maskgit_12 (3 seeds each), provenance cells from the lists in row order."""
    rows = []
    for i, (schedule, cache, fid) in enumerate(
        [("magnets_3333", "refresh_on_switch", 10.0 + s) for s in range(3)] + [("maskgit_12", "none", 11.0 + s) for s in range(3)]
    ):
        row = dict.fromkeys(RESULT_COLUMNS, "")
        row |= {"extractor": "domain", "samples": 100, "fid": fid, "distill": "progressive", "schedule": schedule,
                "cache": cache, "guidance": 0.0, "widths": "8-4-2-1", "seed": i % 3, "checkpoint": "c.ckpt",
                "gflops_per_sample": 1.0 if schedule == "magnets_3333" else 3.0, "rfid": 1.0,
                "tokenizer_sha256": tokenizers[i], "extractor_sha256": extractors[i], "tokenizer_check": checks[i]}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def test_the_claims_refuse_rows_of_two_tokenizers_two_extractors_or_an_override(tmp_path) -> None:
    same = claim_rows(["0123456789012345"] * 6, ["e1"] * 6, ["match"] * 6)
    path = tmp_path / "results.csv"
    same.to_csv(path, index=False)
    read = read_results(path)
    assert read["tokenizer_sha256"].iloc[0] == "0123456789012345"  # an identity of digits stays text
    assert not claims_table(read, "domain").empty
    with pytest.raises(ValueError, match=r"come from 2 tokenizers \(sha256 0123456789012345, abcdef"):
        claims_table(claim_rows(["0123456789012345"] * 5 + ["abcdef"], ["e1"] * 6, ["match"] * 6), "domain")
    with pytest.raises(ValueError, match=r"come from 2 extractor weights \(sha256 e1, e2\)"):
        claims_table(claim_rows(["t"] * 6, ["e1"] * 3 + ["e2"] * 3, ["match"] * 6), "domain")
    with pytest.raises(ValueError, match=r"^1 domain row\(s\) decoded with a tokenizer other than their checkpoint's"):
        claims_table(claim_rows(["t"] * 6, ["e1"] * 6, ["match"] * 5 + ["override"]), "domain")
    # Rows of an earlier version record nothing: read as they were.
    assert not claims_table(claim_rows([""] * 6, [""] * 6, [""] * 6), "domain").empty


def test_resume_last_picks_the_newest_whole_checkpoint_of_a_run_no_other_process_writes(tmp_path, caplog) -> None:
    checkpoints = {}
    for age, run in enumerate(["running", "cut", "finished"]):  # "running" is the newest
        folder = tmp_path / "exp" / run / "checkpoints"
        folder.mkdir(parents=True)
        torch.save({"step": run}, folder / "last.ckpt")
        os.utime(folder / "last.ckpt", ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
        checkpoints[run] = folder / "last.ckpt"
    data = checkpoints["cut"].read_bytes()
    checkpoints["cut"].write_bytes(data[: len(data) // 2])
    os.utime(checkpoints["cut"], ns=(10**18 - 10**9, 10**18 - 10**9))
    with run_lock(tmp_path / "exp" / "running"):  # another run still writes there
        assert resolve_checkpoint("last", tmp_path, "exp", key="resume") == checkpoints["finished"]
        assert "another process is still writing that run" in caplog.text and "not a whole checkpoint" in caplog.text
        # The resuming run's own folder (a requeued job) is not another process's; evaluate may read a running run.
        own = tmp_path / "exp" / "running"
        assert resolve_checkpoint("last", tmp_path, "exp", key="resume", own_run_dir=own) == checkpoints["running"]
        assert resolve_checkpoint("last", tmp_path, "exp") == checkpoints["running"]
    assert resolve_checkpoint("last", tmp_path, "exp", key="resume") == checkpoints["running"]  # that run ended


# --- the three silent paths, on the tiny fixture ---------------------------------------------------------------------


def evaluate_config(runs: Path, classifier: str, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[f"paths.runs={runs}", "samples=20", "batch_size=20", "reference.count=40", "rfid=false",
                       "extractor=fmnist_classifier", f"classifier={classifier}", "schedule=maskgit_4", *extra],
        )  # fmt: skip


def test_a_retrained_tokenizer_is_refused_by_resume_and_evaluate_and_rows_name_what_made_them(tiny_cfg, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="magnets.data.tokenization")
    runs = Path(tiny_cfg.paths.runs)
    first = train(tiny_cfg)
    checkpoint, tokenizer = first["maskgit"]["checkpoint"], first["tokenizer"]
    row = evaluate(evaluate_config(runs, tiny_cfg.classifier.path))
    assert row["checkpoint_sha256"] == identity(checkpoint) and row["tokenizer_sha256"] == identity(tokenizer)
    assert row["tokenizer_check"] == "match"
    assert row["extractor_sha256"] == row["classifier_sha256"] == identity(tiny_cfg.classifier.path)
    old_tokenizer = file_sha256(tokenizer)
    assert torch.load(checkpoint, weights_only=False)["provenance"]["tokenizer_sha256"] == old_tokenizer

    # Retrain the tokenizer under its name, as the refusal of a changed tokenizer advises: the shards are rewritten.
    shutil.rmtree(Path(tiny_cfg.tokenizer.dir) / "checkpoints")
    tokenizer.unlink()
    tiny_cfg.tokenizer.seed = 1
    tiny_cfg.resume = "last"
    tiny_cfg.run_dir = str(runs / "fmnist" / "run2")
    with pytest.raises(MismatchError, match=rf"^cannot resume from {checkpoint}: it was trained on tokens of tokenizer sha256 "):
        train(tiny_cfg)
    assert identity(tokenizer) != row["tokenizer_sha256"]  # the new tokenizer was trained and its shards written
    shard = Path(tiny_cfg.tokenize.out_dir) / "train" / "shard-00000"
    assert f"rewriting {shard}: tokenizer_sha256 was {old_tokenizer!r}, now {file_sha256(tokenizer)!r}" in caplog.text

    # evaluate pairs the old transformer with the tokenizer its config names, now another one: refused, then overridden.
    results = runs / "fmnist" / "results.csv"
    rows_before = results.read_text()
    with pytest.raises(MismatchError, match=rf"^tokenizer {tokenizer} \(sha256 {identity(tokenizer)}\) is not the one"):
        evaluate(evaluate_config(runs, tiny_cfg.classifier.path))
    assert results.read_text() == rows_before
    overridden = evaluate(evaluate_config(runs, tiny_cfg.classifier.path, "allow_tokenizer_mismatch=true", "seed=1"))
    assert overridden["tokenizer_check"] == "override" and overridden["tokenizer_sha256"] == identity(tokenizer)
    with pytest.raises(ValueError, match=r"come from 2 tokenizers"):
        claims_table(read_results(results), "fmnist_classifier")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sample_cfg = compose("sample", overrides=[f"paths.runs={runs}", "samples_per_class=1", f"out_dir={tmp_path / 'grid'}"])
    with pytest.raises(MismatchError, match=rf"^tokenizer {tokenizer} \(sha256 {identity(tokenizer)}\) is not the one"):
        sample(sample_cfg)
    assert not (tmp_path / "grid").exists() or not any((tmp_path / "grid").iterdir())


def test_a_smoke_runs_tokenizer_and_classifier_are_not_reused_by_the_full_run(tiny_cfg) -> None:
    tiny_cfg.stages = ["tokenizer"]
    tiny_cfg.tokenizer.trainer.max_steps = 2  # the smoke run
    train(tiny_cfg)
    tiny_cfg.tokenizer.trainer.max_steps = 4
    with pytest.raises(MismatchError, match=r"tokenizer\.trainer\.max_steps: saved 2, now 4\): give the tokenizer a new"):
        train(tiny_cfg)
    tiny_cfg.tokenizer.trainer.max_steps = 2
    train(tiny_cfg)  # the same settings: reused

    tiny_cfg.data.module.subset = 64  # the smoke run's classifier: a data subset
    classifier = fit_classifier_stage(tiny_cfg)
    trained = classifier.stat().st_mtime_ns
    assert fit_classifier_stage(tiny_cfg) == classifier and classifier.stat().st_mtime_ns == trained  # reused
    tiny_cfg.data.module.subset = None
    tiny_cfg.classifier.epochs = 2
    with pytest.raises(MismatchError, match=r"classifier\.epochs: saved 1, now 2; data\.module\.subset: saved 64, now None\)"):
        fit_classifier_stage(tiny_cfg)
    assert classifier.stat().st_mtime_ns == trained


def test_two_trainings_started_together_get_two_folders_and_keep_both_checkpoints(fake_fmnist, tmp_path) -> None:
    runs = tmp_path / "runs"
    overrides = [*tiny_overrides(fake_fmnist, runs), "sample_validation.enabled=false"]
    env = {**os.environ, "TEST_PAYLOAD_SHA256": json.dumps(fashion_mnist.PAYLOAD_SHA256), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tests" / "entry.py"), "magnets.train", *overrides]
    # The tokenizer and its shards first (what a job array finds ready), then two trainings launched at once.
    subprocess.run([*command, "stages=[tokenizer,tokenize]"], env=env, cwd=tmp_path, check=True, capture_output=True)
    started = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0].decode() for process in started]
    assert [process.returncode for process in started] == [0, 0], outputs
    folders = sorted(p for p in (runs / "fmnist").iterdir() if p.is_dir() and (p / "checkpoints").is_dir())
    assert len(folders) == 2
    assert sorted(folder.name.rsplit("_", 1)[1] for folder in folders) == sorted(str(p.pid) for p in started)
    for folder in folders:
        saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == 4 and Path(saved["config"]["run_dir"]) == folder
        assert (folder / "metrics.json").is_file() and (folder / ".hydra" / "config.yaml").is_file()
