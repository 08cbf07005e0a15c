"""Hand-written mutation testing of magnets' core modules: does the test suite notice a plausible bug?

Each :class:`Mutant` below is one plausible bug, written by hand: an exact snippet of a module under
``src/magnets`` (it must occur exactly once in that file), the snippet that replaces it, a one-line description
of the bug, and the test files that cover that code. For every mutant the runner

1. copies ``src/`` once into a temporary folder (``tempfile.mkdtemp``) -- the repository is never modified;
2. writes the mutated module into that copy;
3. runs ``python -m pytest -x -q -p no:cacheprovider -m "not slow and not gpu" <its tests>`` from the
   repository root, with the copy's ``src`` first on ``PYTHONPATH`` (so ``import magnets`` loads the copy),
   ``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1`` and ``PYTHONDONTWRITEBYTECODE=1`` (a mutant and its restored
   original can share size and mtime second, so no ``.pyc`` may be reused), under a per-mutant timeout;
4. restores the original module in the copy.

A mutant whose tests fail is *killed*; one whose tests pass *survived* (a gap in the suite); one whose tests run
past the timeout is counted as killed but reported as *timeout*. Before any mutant, the runner checks that
``import magnets`` resolves to the copy and that the unmutated copy passes every selected test file; if not it
stops, naming the failures (a mutant run against a failing suite would mean nothing).

Everything but ``src/`` is reached from the copy through symbolic links to the repository's top-level entries,
because modules find ``conf/`` relative to their own file (``Path(__file__).parents[...]``).

    .venv/bin/python tools/mutate.py                      # every mutant -> runs/mutation.json
    .venv/bin/python tools/mutate.py --list               # the mutants, their bugs and tests
    .venv/bin/python tools/mutate.py --only loop_choice_noise_off_by_one claims_front_strict_gflops

The kill rate is a report, not a gate: the exit status is 0 unless the tool itself fails (2: a snippet not found
exactly once, an unknown ``--only`` name, the import check or the unmutated baseline failing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "magnets"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_OUT = Path("runs/mutation.json")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu")
NOT_LINKED = {"src", ".git"}  # top-level entries of the repository not linked into the copy


class ToolError(Exception):
    """The runner itself cannot go on (as opposed to a mutant surviving, which is a result)."""


@dataclass(frozen=True)
class Mutant:
    """One plausible bug: ``original`` (exactly once in ``src/magnets/<module>``) becomes ``mutated``."""

    name: str
    module: str  # path under src/magnets, e.g. "decoding/loop.py"
    original: str
    mutated: str
    description: str
    tests: tuple[str, ...]  # test files run against it (fastest or most targeted first: pytest -x stops at a failure)


# Test files, by the code they cover (grep tests/ for the module's functions).
SEMANTICS = "tests/test_semantics.py"
DECODING = "tests/test_decoding.py"
POLICIES = "tests/test_policies.py"
FRAME_PREDICTION = "tests/test_frame_prediction.py"
MASKGIT = "tests/test_maskgit.py"
BENCH = "tests/test_bench.py"
SCHEDULE_SEARCH = "tests/test_schedule_search.py"
FID = "tests/test_fid.py"
FID_PROTOCOL = "tests/test_fid_protocol.py"
FVD = "tests/test_fvd.py"
SHARDS = "tests/test_shards.py"
IMAGENET_TOKENIZATION = "tests/test_imagenet_tokenization.py"
CLAIMS = "tests/test_claims.py"
# Behaviour-pinning tests written for the mutants the suite above let survive.
PINNED_DECODING = "tests/test_pinned_decoding.py"
PINNED_MASKING = "tests/test_pinned_masking.py"
PINNED_METRICS = "tests/test_pinned_metrics.py"
PINNED_SHARDS = "tests/test_pinned_shards.py"
PINNED_CLAIMS = "tests/test_pinned_claims.py"

MUTANTS: tuple[Mutant, ...] = (
    # --- decoding/schedules.py -------------------------------------------------------------------------------------
    Mutant(
        "schedules_cut_clamp_to_k",
        "decoding/schedules.py",
        "min(max(int(c), 0), total - 1) for c in cuts",
        "min(max(int(c), 0), total) for c in cuts",
        "search cuts are clamped to [0, K] instead of [0, K-1]: a searched schedule can give the full width 0 steps",
        (SCHEDULE_SEARCH,),
    ),
    Mutant(
        "schedules_width_order_reversed",
        "decoding/schedules.py",
        "zip(self.widths, self.steps, strict=True)",
        "zip(self.widths[::-1], self.steps[::-1], strict=True)",
        "width_per_step runs the schedule's widths last-first (scale up becomes scale down)",
        (POLICIES, DECODING, SCHEDULE_SEARCH),
    ),
    # --- masking.py ------------------------------------------------------------------------------------------------
    Mutant(
        "masking_square_root_is_square",
        "masking.py",
        '"square_root": lambda r: 1.0 - math.sqrt(r),',
        '"square_root": lambda r: 1.0 - r**2,',
        "the square_root mask schedule is MaskGIT's 'square' variant 1 - r^2 instead of 1 - sqrt(r)",
        (PINNED_MASKING, SEMANTICS, DECODING, MASKGIT),
    ),
    Mutant(
        "masking_decode_counts_ceil",
        "masking.py",
        "target = math.floor(num_masked * mask_ratio((k + 1) / steps, schedule))",
        "target = math.ceil(num_masked * mask_ratio((k + 1) / steps, schedule))",
        "decode_masked_counts rounds the tokens left masked up instead of down (reveals one fewer per step)",
        (SEMANTICS, DECODING),
    ),
    Mutant(
        "masking_training_mask_one_extra",
        "masking.py",
        "return ranks < counts[:, None]",
        "return ranks <= counts[:, None]",
        "random_training_mask masks one more position than ceil(ratio * M) (off by one in the rank cut)",
        (SEMANTICS, FRAME_PREDICTION, MASKGIT),
    ),
    # --- decoding/loop.py ------------------------------------------------------------------------------------------
    Mutant(
        "loop_choice_noise_off_by_one",
        "decoding/loop.py",
        "noise_scale = settings.choice_temperature * (1 - (step + 1) / steps)",
        "noise_scale = settings.choice_temperature * (1 - step / steps)",
        "the Gumbel choice noise anneals with (1 - k/K) instead of (1 - (k+1)/K): one step late",
        (SEMANTICS, POLICIES, DECODING),
    ),
    Mutant(
        "loop_guidance_steps_off_by_one",
        "decoding/loop.py",
        "step >= steps - self.guidance_steps",
        "step > steps - self.guidance_steps",
        "guidance_steps=n guides only the last n-1 steps",
        (SEMANTICS, POLICIES, DECODING),
    ),
    Mutant(
        "loop_unconditional_width_wider",
        "decoding/loop.py",
        "return max(width, self.guidance_width)",
        "return min(width, self.guidance_width)",
        "the separate unconditional pass runs at the wider of the two widths instead of the narrower",
        (SEMANTICS, POLICIES, DECODING),
    ),
    Mutant(
        "loop_no_float32_upcast",
        "decoding/loop.py",
        "logits = logits.float()",
        "logits = logits",
        "a bf16/fp16 decode combines guidance and takes the softmax in reduced precision (no float32 upcast)",
        (PINNED_DECODING, SEMANTICS, DECODING),
    ),
    Mutant(
        "loop_temperature_zero_accepted",
        "decoding/loop.py",
        "if self.temperature <= 0 or self.temperature_anneal < 0:",
        "if self.temperature < 0 or self.temperature_anneal < 0:",
        "SamplingSettings accepts temperature=0 (< instead of <=), which divides the logits by zero at the last step",
        (PINNED_DECODING, SEMANTICS, DECODING),
    ),
    # --- decoding/cache.py -----------------------------------------------------------------------------------------
    Mutant(
        "cache_keep_overwrites_length",
        "decoding/cache.py",
        "self.length += count",
        "self.length = count",
        "KVCache.keep sets the cache length instead of extending it: the next pass writes over older entries",
        (DECODING, FRAME_PREDICTION),
    ),
    # --- decoding/plan.py ------------------------------------------------------------------------------------------
    Mutant(
        "plan_refresh_every_n_late",
        "decoding/plan.py",
        "steps_since_refresh >= refresh_every",
        "steps_since_refresh > refresh_every",
        "refresh_every_n refreshes after n+1 steps without one instead of n",
        (SEMANTICS, DECODING, POLICIES),
    ),
    Mutant(
        "plan_refresh_every_zero_accepted",
        "decoding/plan.py",
        'if mode == "refresh_every_n" and refresh_every < 1:',
        'if mode == "refresh_every_n" and refresh_every < 0:',
        "check_cache_mode accepts refresh_every=0 (< 0 instead of < 1)",
        (PINNED_DECODING, SEMANTICS, DECODING, POLICIES),
    ),
    # --- decoding/flops.py -----------------------------------------------------------------------------------------
    Mutant(
        "flops_attention_at_stream_width",
        "decoding/flops.py",
        "attention = 2 * 2 * queries * keys * D",
        "attention = 2 * 2 * queries * keys * d",
        "attention FLOPs counted at the sub-model's stream width d instead of the full width D",
        (DECODING, POLICIES, BENCH),
    ),
    # --- decoding/policies.py --------------------------------------------------------------------------------------
    Mutant(
        "policies_confident_share_floor",
        "decoding/policies.py",
        "keep = min(m, max(math.ceil(self.route.fraction * m), reveal))",
        "keep = min(m, max(math.floor(self.route.fraction * m), reveal))",
        "confidence routing keeps floor(fraction * M) tokens wide instead of rounding up",
        (POLICIES,),
    ),
    Mutant(
        "policies_fraction_zero_accepted",
        "decoding/policies.py",
        "if not 0 < self.fraction <= 1:",
        "if not 0 <= self.fraction <= 1:",
        "RouteSettings accepts route fraction 0 (<= instead of <)",
        (PINNED_DECODING, POLICIES),
    ),
    # --- lit/maskgit.py (distillation) -----------------------------------------------------------------------------
    Mutant(
        "distill_teacher_not_detached",
        "lit/maskgit.py",
        "teacher_probs = F.softmax(logits.detach(), dim=-1)",
        "teacher_probs = F.softmax(logits, dim=-1)",
        "the soft targets are not detached: the student's loss trains the teacher",
        (SEMANTICS, MASKGIT),
    ),
    Mutant(
        "distill_teacher_student_swapped",
        "lit/maskgit.py",
        "self.widths = sorted(self.model.cfg.widths)",
        "self.widths = sorted(self.model.cfg.widths, reverse=True)",
        "widths run smallest first: each larger width distills from the next smaller one (teacher and student swapped)",
        (SEMANTICS, MASKGIT),
    ),
    Mutant(
        "distill_teacher_softmax_axis",
        "lit/maskgit.py",
        "teacher_probs = F.softmax(logits.detach(), dim=-1)",
        "teacher_probs = F.softmax(logits.detach(), dim=0)",
        "the teacher's soft targets are normalised over the masked positions instead of the codebook (wrong axis)",
        (SEMANTICS, MASKGIT),
    ),
    # --- metrics/fid.py --------------------------------------------------------------------------------------------
    Mutant(
        "fid_distance_in_float32",
        "metrics/fid.py",
        '.to("cpu", torch.float64) for x in (mu1, sigma1, mu2, sigma2)',
        '.to("cpu", torch.float32) for x in (mu1, sigma1, mu2, sigma2)',
        "frechet_distance computes in float32 instead of float64",
        (FID, FID_PROTOCOL, FVD),
    ),
    Mutant(
        "fid_reference_cov_ddof",
        "metrics/fid.py",
        "metric.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mean, mean)",
        "metric.real_features_cov_sum = cov * n + n * torch.outer(mean, mean)",
        "preloaded reference statistics turn the unbiased covariance back into sums with n instead of n - 1",
        (FID, FID_PROTOCOL, FVD),
    ),
    Mutant(
        "fid_tf1_resize_axes_swapped",
        "metrics/fid.py",
        "theta[0, 2] = 1 / w - 1 / size",
        "theta[0, 2] = 1 / h - 1 / size",
        "TF1 bilinear resize shifts the x sampling grid by the image height instead of its width",
        (PINNED_METRICS, FID, FVD),
    ),
    # --- metrics/fvd.py --------------------------------------------------------------------------------------------
    Mutant(
        "fvd_frames_not_transposed",
        "metrics/fvd.py",
        "frames = clips.transpose(1, 2).reshape(b * t, c, h, w)",
        "frames = clips.reshape(b * t, c, h, w)",
        "resize_frames reshapes [B, C, T, H, W] to frames without moving time before channels (mixes frames)",
        (PINNED_METRICS, FVD),
    ),
    Mutant(
        "fvd_min_frames_inclusive",
        "metrics/fvd.py",
        "if x.shape[2] < I3D_MIN_FRAMES:",
        "if x.shape[2] <= I3D_MIN_FRAMES:",
        "I3D refuses clips of exactly the minimum 9 frames",
        (FVD,),
    ),
    Mutant(
        "fvd_no_quantisation",
        "metrics/fvd.py",
        "x = x.float().clamp(0, 1).mul(255).round()",
        "x = x.float().clamp(0, 1).mul(255)",
        "I3D preprocessing skips quantising to the 256 levels of a saved video",
        (FVD,),
    ),
    # --- data/shards.py --------------------------------------------------------------------------------------------
    Mutant(
        "shards_row_lookup_side_left",
        "data/shards.py",
        'part = int(np.searchsorted(self.offsets, index, side="right")) - 1',
        'part = int(np.searchsorted(self.offsets, index, side="left")) - 1',
        "ConcatenatedRows finds an int row's shard with side='left': the first row of each shard is looked up in the one before",
        (PINNED_SHARDS, SHARDS, IMAGENET_TOKENIZATION),
    ),
    Mutant(
        "shards_same_permutation_every_epoch",
        "data/shards.py",
        "np.random.default_rng([self.seed, epoch])",
        "np.random.default_rng(self.seed)",
        "SeededTokenBatches visits the items in the same order every epoch (the epoch is left out of the seed)",
        (SHARDS,),
    ),
    # --- claims.py -------------------------------------------------------------------------------------------------
    Mutant(
        "claims_se_factor_not_squared",
        "claims.py",
        "(baseline_factor * baseline.std) ** 2",
        "baseline_factor * baseline.std**2",
        "claim (a)'s standard error scales the baseline variance by 1.1 instead of 1.1^2",
        (PINNED_CLAIMS, CLAIMS),
    ),
    Mutant(
        "claims_front_strict_gflops",
        "claims.py",
        'cheaper = front[front["gflops"] <= candidate["gflops"]]',
        'cheaper = front[front["gflops"] < candidate["gflops"]]',
        "the front leaves out static configurations exactly as cheap as the candidate (< instead of <=)",
        (CLAIMS,),
    ),
    Mutant(
        "claims_gflops_ratio_inclusive",
        "claims.py",
        "if ratio < GFLOPS_RATIO:",
        "if ratio <= GFLOPS_RATIO:",
        "claim (a) fails a candidate exactly 2.5x cheaper (<= instead of <)",
        (PINNED_CLAIMS, CLAIMS),
    ),
)


@dataclass
class Outcome:
    """What one mutant's test run gave."""

    mutant: Mutant
    status: str  # killed | survived | timeout
    seconds: float
    returncode: int | None  # pytest's exit status; None after a timeout
    killed_by: str  # the first failing test pytest names ("" when none is named)


def check_mutants(mutants: Sequence[Mutant], src: Path) -> None:
    """Raise :class:`ToolError` unless every mutant's snippet occurs exactly once in its module under ``src`` and
    every test file it names exists. Names must be unique and a mutation must change the text."""
    names = [m.name for m in mutants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolError(f"mutant names must be unique; repeated: {duplicates}")
    problems = []
    for mutant in mutants:
        path = src / PACKAGE / mutant.module
        if not path.is_file():
            problems.append(f"{mutant.name}: no module {path}")
            continue
        count = path.read_text(encoding="utf-8").count(mutant.original)
        if count != 1:
            problems.append(f"{mutant.name}: the original snippet occurs {count} times in src/{PACKAGE}/{mutant.module} "
                            f"(it must occur exactly once): {mutant.original!r}")  # fmt: skip
        if mutant.original == mutant.mutated:
            problems.append(f"{mutant.name}: the mutated snippet is the original")
        if isinstance(mutant.tests, str):  # ("tests/x.py") without its comma is a string, not a tuple
            problems.append(f"{mutant.name}: tests must be a tuple of test files, got the string {mutant.tests!r}")
            continue
        missing = [test for test in mutant.tests if not (REPO / test).is_file()]
        if missing or not mutant.tests:
            problems.append(f"{mutant.name}: test files missing: {missing or 'none named'}")
    if problems:
        raise ToolError("bad mutant definitions:\n  " + "\n  ".join(problems))


def select(mutants: Sequence[Mutant], only: Sequence[str] | None) -> list[Mutant]:
    """The mutants named in ``only`` (all when None), in definition order; unknown names raise :class:`ToolError`."""
    if not only:
        return list(mutants)
    known = {m.name for m in mutants}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ToolError(f"unknown mutant(s) {unknown}; run with --list to see them")
    return [m for m in mutants if m.name in set(only)]


def make_copy(repo: Path) -> Path:
    """A temporary folder holding a copy of ``repo/src`` (no bytecode) and links to the repository's other top-level
    entries (``conf/`` is found relative to the modules' own files)."""
    root = Path(tempfile.mkdtemp(prefix="magnets-mutate-"))
    shutil.copytree(repo / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for entry in repo.iterdir():
        if entry.name not in NOT_LINKED:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


def subprocess_env(copy: Path) -> dict[str, str]:
    """The environment of the test runs: the copy's ``src`` first on ``PYTHONPATH``, one thread, offline, no bytecode."""
    env = dict(os.environ)
    existing = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(copy / "src") + (os.pathsep + existing if existing else "")
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def run_command(command: Sequence[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``command`` from the repository root in its own process group; (exit status or None on timeout, combined
    output, seconds). On timeout the whole group (pytest and anything it started) is killed."""
    started = time.monotonic()
    with subprocess.Popen(
        list(command), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            returncode = None
        except BaseException:  # Ctrl-C: take the test run down with the runner
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return returncode, output, time.monotonic() - started


def pytest_command(tests: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]


FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def failures(output: str) -> list[str]:
    """The test ids pytest's short summary names as failed or in error."""
    return [f"{kind} {test}" for kind, test in FAILED_LINE.findall(output)]


def check_import(copy: Path, env: dict[str, str]) -> str:
    """``magnets.__file__`` as the test subprocesses import it; :class:`ToolError` unless it lies in the copy."""
    code = f"import {PACKAGE}; print({PACKAGE}.__file__)"
    returncode, output, _ = run_command([sys.executable, "-c", code], env, timeout=120)
    location = output.strip().splitlines()[-1] if output.strip() else ""
    expected = copy / "src" / PACKAGE
    if returncode != 0 or not Path(location).resolve().is_relative_to(expected.resolve()):
        raise ToolError(f"`import {PACKAGE}` in the test subprocess gave {location or output!r}, not the copy in {expected}")
    return location


def check_baseline(tests: Sequence[str], env: dict[str, str], timeout: float) -> float:
    """Seconds the unmutated copy takes to pass ``tests``; :class:`ToolError` naming the failures if it does not."""
    returncode, output, seconds = run_command(pytest_command(tests), env, timeout)
    if returncode is None:
        raise ToolError(f"the unmutated code did not finish {list(tests)} within {timeout:.0f} s")
    if returncode != 0:
        named = failures(output) or output.strip().splitlines()[-15:]
        raise ToolError(
            f"the unmutated code fails the selected tests (pytest exit {returncode}); fix them before mutating:\n  "
            + "\n  ".join(named)
        )
    return seconds


def run_mutant(mutant: Mutant, copy: Path, env: dict[str, str], timeout: float) -> Outcome:
    """Write ``mutant`` into the copy, run its tests, restore the original module (whatever happens)."""
    path = copy / "src" / PACKAGE / mutant.module
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.original) != 1:  # check_mutants saw it once; the copy must still hold it so
        raise ToolError(f"{mutant.name}: the snippet is no longer exactly once in the copy of {mutant.module}")
    try:
        path.write_text(original.replace(mutant.original, mutant.mutated), encoding="utf-8")
        returncode, output, seconds = run_command(pytest_command(mutant.tests), env, timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    named = failures(output)
    if returncode is None:
        return Outcome(mutant, "timeout", seconds, None, "")
    return Outcome(mutant, "survived" if returncode == 0 else "killed", seconds, returncode, named[0] if named else "")


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Totals and the kill rate (killed + timeout over all)."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("killed", "survived", "timeout")}
    total = len(outcomes)
    detected = counts["killed"] + counts["timeout"]
    return {"total": total, **counts, "kill_rate": detected / total if total else None}


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(outcomes: Sequence[Outcome], baseline_seconds: float, wall_seconds: float, timeout: float) -> dict[str, Any]:
    """The JSON document of a run."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pytest": shlex.join(["python", "-m", "pytest", *PYTEST_ARGS]),
        "timeout_s": timeout,
        "baseline_seconds": round(baseline_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "mutants": [
            {
                "name": o.mutant.name,
                "module": f"src/{PACKAGE}/{o.mutant.module}",
                "description": o.mutant.description,
                "tests": list(o.mutant.tests),
                "status": o.status,
                "seconds": round(o.seconds, 1),
                "returncode": o.returncode,
                "killed_by": o.killed_by,
            }
            for o in outcomes
        ],
        "totals": summary(outcomes),
    }


def print_table(outcomes: Sequence[Outcome]) -> None:
    rows = [(o.mutant.name, o.mutant.module, o.status, f"{o.seconds:.0f}", o.killed_by) for o in outcomes]
    header = ("mutant", "module", "status", "s", "first failure")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    totals = summary(outcomes)
    rate = "n/a" if totals["kill_rate"] is None else f"{100 * totals['kill_rate']:.1f}%"
    print(f"\nkilled {totals['killed']}, timeout {totals['timeout']}, survived {totals['survived']} of {totals['total']}: "
          f"kill rate {rate}")  # fmt: skip


def list_mutants(mutants: Sequence[Mutant]) -> None:
    for m in mutants:
        print(f"{m.name}  [src/{PACKAGE}/{m.module}]\n    {m.description}\n    - {m.original}\n    + {m.mutated}\n"
              f"    tests: {' '.join(m.tests)}")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/mutate.py", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (see --list)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT}, from the repo root)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutant (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy of src/ (its path is printed)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    copy: Path | None = None
    try:
        check_mutants(MUTANTS, REPO / "src")
        mutants = select(MUTANTS, args.only)
        if args.list:
            list_mutants(mutants)
            return 0
        started = time.monotonic()
        copy = make_copy(REPO)
        check_mutants(mutants, copy / "src")  # the snapshot the mutants are written into
        env = subprocess_env(copy)
        print(f"copy of src/: {copy / 'src'}")
        print(f"import {PACKAGE} in the test subprocess -> {check_import(copy, env)}")
        tests = list(dict.fromkeys(test for m in mutants for test in m.tests))
        print(f"baseline: the unmutated copy against {len(tests)} test files ...", flush=True)
        baseline_seconds = check_baseline(tests, env, args.timeout * len(tests))
        print(f"baseline passes ({baseline_seconds:.0f} s)", flush=True)
        outcomes = []
        for index, mutant in enumerate(mutants, 1):
            outcome = run_mutant(mutant, copy, env, args.timeout)
            outcomes.append(outcome)
            print(f"[{index}/{len(mutants)}] {mutant.name}: {outcome.status} ({outcome.seconds:.0f} s)"
                  f"{'  ' + outcome.killed_by if outcome.killed_by else ''}", flush=True)  # fmt: skip
        wall = time.monotonic() - started
        out = args.out if args.out.is_absolute() else REPO / args.out
        write_json_atomically(out, report(outcomes, baseline_seconds, wall, args.timeout))
        print()
        print_table(outcomes)
        print(f"wall time {wall / 60:.1f} min; wrote {out}")
        return 0
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if copy is not None:
            if args.keep:
                print(f"kept the copy at {copy}")
            else:
                shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
