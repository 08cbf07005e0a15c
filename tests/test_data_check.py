"""`python -m magnets.data.check`: every bad file counted and listed, exit 0; no dataset: one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, compose_config
from magnets.data.check import run_check
from magnets.data.moving_fmnist import write_video
from magnets.errors import ConfigError


def check_command(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "magnets.data.check", "data=ucf101", *overrides]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )


def ucf_tree(root: Path) -> None:
    """Two classes, five good videos, a garbage file, a video too short for 5 frames, a listed file that is not there."""
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 40, 3), dtype=np.uint8)
    for name in ("A/v_A_g08_c01", "A/v_A_g09_c01", "B/v_B_g08_c01", "A/v_A_g01_c01", "B/v_B_g01_c01"):
        write_video(root / f"{name}.avi", frames)
    write_video(root / "B" / "v_B_g09_c01.avi", frames[:4])
    (root / "B" / "v_B_g10_c01.avi").write_bytes(b"\x00\x01garbage" * 100)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 A\r\n2 B\r\n")
    train = ["A/v_A_g08_c01.avi 1", "A/v_A_g09_c01.avi 1", "B/v_B_g08_c01.avi 2", "B/v_B_g09_c01.avi 2", "B/v_B_g10_c01.avi 2"]
    (lists / "trainlist01.txt").write_bytes("".join(f"{line}\r\n" for line in train).encode())
    (lists / "testlist01.txt").write_bytes(b"A/v_A_g01_c01.avi\r\nB/v_B_g01_c01.avi\r\nB/v_B_g02_c01.avi\r\n")


def test_check_counts_and_lists_bad_files(tmp_path):
    ucf_tree(tmp_path / "ucf")
    result = check_command(
        f"data.root={tmp_path / 'ucf'}", "data.frames=5", "data.module.val_size=1", f"paths.runs={tmp_path}/runs"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "runs" / "data_check" / "ucf101.json").read_text())
    assert report["classes"] == 2 and report["class_names"] == ["A", "B"]
    splits = report["splits"]
    assert splits["train"]["listed"] + splits["val"]["listed"] == 5 and splits["test"]["listed"] == 3
    assert splits["train"]["items"] + splits["val"]["items"] == 3 and splits["test"]["items"] == 2
    assert splits["test"]["frames"] == {"min": 8.0, "median": 8.0, "max": 8.0}
    assert (splits["test"]["height"]["max"], splits["test"]["width"]["max"]) == (32.0, 40.0)
    reasons = {Path(bad["file"]).name: bad["reason"] for bad in report["bad_files"]}
    assert reasons["v_B_g02_c01.avi"] == "missing"
    assert reasons["v_B_g09_c01.avi"] == "too short: 4 frames, a clip of 5 at stride 1 needs 5"
    assert reasons["v_B_g10_c01.avi"].startswith("unreadable")
    assert len(reasons) == 3
    assert "bad files: 3" in result.stdout and "v_B_g10_c01.avi: unreadable" in result.stdout
    assert str(tmp_path / "runs" / "data_check" / "ucf101.json") in result.stdout


def test_check_without_data_is_one_line_and_exit_2(tmp_path):
    result = check_command(f"data.root={tmp_path / 'absent'}", f"paths.runs={tmp_path}/runs")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: UCF101 not found: ") and str(tmp_path / "absent") in result.stderr
    assert "crcv.ucf.edu" in result.stderr


def test_check_refuses_an_image_dataset(tmp_path):
    with pytest.raises(ConfigError, match="data='fmnist'"):
        run_check(compose_config(["data=fmnist", f"paths.runs={tmp_path}"]))
