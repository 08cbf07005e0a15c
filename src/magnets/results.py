"""The results file of ``magnets.evaluate``: its columns, safe appends by parallel jobs, and the mean and std rows of
several seeds.

A results CSV gains a row per evaluated seed (and the seeds' ``mean`` and ``std`` rows); :mod:`magnets.claims` and the
notebook read it. Appends take a file lock and write in one call, so a multirun's jobs can share one file.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import io
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from magnets.files import atomic_write_text

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "experiment", "checkpoint", "distill", "task", "schedule", "widths", "steps_per_width", "cache", "guidance", "policy",
    "steps", "samples", "extractor", "reference", "seed", "aggregate", "n_seeds", "fid", "fvd", "rfid", "inception_score",
    "inception_score_std", "class_acc", "gflops_per_sample", "seconds", "git_commit", "grid",
    "checkpoint_sha256", "tokenizer_sha256", "tokenizer_check", "extractor_sha256", "classifier_sha256",
)  # fmt: skip
"""A row per seed (``seed`` its seed, ``aggregate`` empty, ``n_seeds`` 1); with several seeds two more, ``aggregate``
``mean`` and ``std`` (``seed`` empty, ``n_seeds`` their number). ``rfid``: the tokenizer's reconstruction FID (FVD).
``policy``: what the decode set beyond one width per step and batched guidance (``magnets.decoding.policies.policy_label``:
routing, partial refresh, guidance apart), empty when nothing. The ``*_sha256`` columns are the identities
(:func:`magnets.provenance.identity`) of the files the row came from: transformer checkpoint, tokenizer, the
extractor's weights and the classifier of ``class_acc`` (empty without one); ``tokenizer_check`` says whether the
tokenizer is the one the checkpoint trained on (:data:`magnets.provenance.TOKENIZER_CHECKS`)."""


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path``: :func:`append_results` of one row."""
    append_results(path, [row])


def append_results(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header first if new) under an exclusive lock, in one write: a parallel job's
    rows never come between them."""
    path = Path(path)
    for row in rows:
        if set(row) != set(RESULT_COLUMNS):
            raise ValueError(f"a result row needs exactly the columns {list(RESULT_COLUMNS)}; got {sorted(row)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = io.StringIO()
    csv.DictWriter(lines, fieldnames=RESULT_COLUMNS, lineterminator="\n").writerows(rows)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        header = ""
        if not path.exists() or path.stat().st_size == 0:
            header = ",".join(RESULT_COLUMNS) + "\n"
        else:
            with open(path, newline="") as existing:
                found = next(csv.reader(existing), [])
            if tuple(found) != RESULT_COLUMNS:
                upgrade_columns(path, found)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (header + lines.getvalue()).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def upgrade_columns(path: Path, found: list[str]) -> None:
    """Rewrite the results file ``path`` (atomically; the caller holds its lock) with the columns of
    :data:`RESULT_COLUMNS` when its header ``found`` is a subset of them (a file of an earlier version): the new cells of
    its rows stay empty, which the claims read as unrecorded. Any other header is refused."""
    if not set(found) < set(RESULT_COLUMNS):
        unknown = sorted(set(found) - set(RESULT_COLUMNS))
        raise ValueError(
            f"{path} has columns {found}, not {list(RESULT_COLUMNS)} (unknown: {unknown}): write to another results file"
        )
    with open(path, newline="") as existing:
        old_rows = list(csv.DictReader(existing))
    new = io.StringIO()
    writer = csv.DictWriter(new, fieldnames=RESULT_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(old_rows)
    atomic_write_text(path, new.getvalue())
    added = [column for column in RESULT_COLUMNS if column not in found]
    log.info("%s: added the columns %s (empty in its %d earlier rows)", path, added, len(old_rows))


def git_commit() -> str:
    """The short commit of the code that ran, with ``+dirty`` for uncommitted changes; ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


SEED_METRICS = ("fid", "fvd", "rfid", "inception_score", "inception_score_std", "class_acc", "gflops_per_sample", "seconds")
"""The columns that the mean and std rows summarise over the seed rows; the others (``samples`` too: each seed's count)
are the seeds' shared values, so a mean row and its std row name the same configuration."""


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``mean`` and ``std`` (sample std, ddof=1) rows of two or more seed rows: every column of ``SEED_METRICS`` over
    the seeds (empty where the seeds' cells are), the shared columns as they are, ``seed`` and ``grid`` empty."""
    if len(rows) < 2:
        raise ValueError(f"the mean and std of seeds need at least 2 seed rows, got {len(rows)}")
    shared = {column: rows[0][column] for column in RESULT_COLUMNS if column not in SEED_METRICS}
    differing = [c for c in shared if c not in ("seed", "grid") and any(r[c] != shared[c] for r in rows)]
    if differing:
        raise ValueError(f"seed rows of one configuration differ in {differing}: only {list(SEED_METRICS)} may")
    shared |= {"seed": "", "grid": "", "n_seeds": len(rows)}
    summaries = []
    for name, reduce in (("mean", np.mean), ("std", functools.partial(np.std, ddof=1))):
        row = shared | {"aggregate": name}
        for column in SEED_METRICS:
            values = [r[column] for r in rows]
            row[column] = "" if any(v == "" for v in values) else round(float(reduce(np.asarray(values, dtype=float))), 6)
        summaries.append(row)
    return summaries


def objectives(row: dict[str, Any]) -> tuple[float, float]:
    """What a Hydra sweeper minimises: the row's Fréchet distance (FID or FVD) and its GFLOPs per sample."""
    frechet = row["fid"] if row["fid"] != "" else row["fvd"]
    return float(frechet), float(row["gflops_per_sample"])


def rounded_or_empty(value: float, digits: int) -> float | str:
    """``value`` rounded, or an empty cell for NaN (a metric the row does not have)."""
    return "" if math.isnan(value) else round(value, digits)
