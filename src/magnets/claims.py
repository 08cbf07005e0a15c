"""The paper's five claims as a table: each side's mean ± std over sampling seeds, the difference against two standard
errors, and a verdict.

    python -m magnets.claims runs/fmnist_paper/results.csv [--extractor inception_offline] [--samples 2000]
    make claims EXP=fmnist_paper

Reads the seed rows that ``magnets.evaluate seeds=[...]`` appended to a results CSV (the newest row of each seed of a
configuration) and, for claim (e), the held-out masked-token cross-entropy per width in the ``metrics.json`` beside the
evaluated checkpoints' runs. Writes ``claims_<extractor>.csv`` and ``claims_<extractor>.md`` beside the results file
and prints the markdown.

The claims, all at the same extractor and sample count:

(a) ``magnets_3333`` with refresh-on-switch caching is within 10% of uncached ``maskgit_12``'s FID at >= 2.5x fewer
    GFLOPs;
(b) scaling up beats scaling down at equal steps: ``magnets_3333`` below ``scale_down_3333`` (both cached);
(c) a smooth schedule beats an abrupt one: ``magnets_3333`` below ``abrupt_6006`` (both cached);
(d) no refresh is worse than refresh on switch: ``magnets_3333`` ``no_refresh`` above ``refresh_on_switch``;
(e) progressive distillation beats none for the small widths: ``m{p}_12`` uncached of the progressively distilled
    nested model below that of the nested model trained on ground truth only (``distill`` column), for p = 8, 4, 2.

Beside them, ``front_<extractor>.csv`` (and a second markdown table) places every configuration of a schedule over several widths
against the static front: the best configuration of one width for all steps (plain MaskGIT at some K, or one
sub-model alone) of at most its GFLOPs; ``below`` it means better by more than two standard errors. And
``distillation_<extractor>.csv`` (a third table) is the distillation ablation: for each width, the held-out CE and the
distance of that width alone (``m{p}_12``, ``maskgit_12`` at full width; uncached) of the progressively distilled
nested model, the nested model on ground truth only and the single-width model trained alone; then ``magnets_3333``
cached for the two nested models. Where the results hold the schedule search's trials (``search_*``, ``make sweep
SWEEP=schedule_search``), ``search_<extractor>.csv`` (a fourth table) places each against the shipped schedules' front
in the same way: ``below`` or ``on`` it is a searched schedule beyond or on that front. Where they hold decode
policies (``policy`` column: routing, partial refresh, guidance apart; or the sandwich and scale-down orders, ``make
sweep SWEEP=policies``), ``policies_<extractor>.csv`` (a fifth table) places each against the static front.

A comparison *holds* when the difference has the claimed sign and exceeds two standard errors of the difference
(``sqrt(s1^2/n1 + s2^2/n2)``, the seeds' sample standard deviations), *fails* when it exceeds them with the other sign
(for (a): when FID exceeds 1.1x the baseline's by more than two standard errors, or the GFLOPs ratio is below 2.5),
and is *not resolved* within them; a configuration missing from the results is *not measured*.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from magnets.files import atomic_write, atomic_write_text

FID_MARGIN = 0.10
"""Claim (a): the candidate's FID may exceed the baseline's by at most this fraction."""
GFLOPS_RATIO = 2.5
"""Claim (a): the baseline's GFLOPs per sample over the candidate's must be at least this."""
SIGNIFICANCE_SE = 2.0
"""A difference is resolved when it exceeds this many standard errors."""
CONFIG_COLUMNS = ["distill", "schedule", "cache", "guidance", "policy"]
"""What names one configuration of a results file, beside its extractor and sample count."""


@dataclass(frozen=True)
class Config:
    """One decode configuration of one model: the results rows' ``schedule``, ``cache``, ``distill``, ``policy`` and
    ``guidance``."""

    schedule: str
    cache: str
    distill: str = "progressive"
    policy: str = ""
    guidance: float = 0.0

    def label(self) -> str:
        distill = {"progressive": "", "none": " (no distillation)", "single": " (single width)"}.get(self.distill, "")
        return config_label(self.schedule, self.cache, self.policy, self.guidance) + distill


def config_label(schedule: str, cache: str, policy: str = "", guidance: float = 0.0) -> str:
    """``schedule/cache``, then ``/policy`` and ``/w=guidance`` where set."""
    return f"{schedule}/{cache}" + (f"/{policy}" if policy else "") + (f"/w={guidance:g}" if guidance else "")


@dataclass(frozen=True)
class Claim:
    """``candidate`` against ``baseline``: ``better`` (lower distance), ``worse`` (higher), or ``within`` (claim (a))."""

    key: str
    statement: str
    candidate: Config
    baseline: Config
    test: str
    width: int | None = None  # claim (e): the width whose held-out CE is reported


CACHED = "refresh_on_switch"
CLAIMS = (
    Claim("a", "magnets_3333 cached within 10% of maskgit_12's FID at >= 2.5x fewer GFLOPs",
          Config("magnets_3333", CACHED), Config("maskgit_12", "none"), "within"),
    Claim("b", "scale-up beats scale-down at equal steps",
          Config("magnets_3333", CACHED), Config("scale_down_3333", CACHED), "better"),
    Claim("c", "smooth magnets_3333 beats abrupt abrupt_6006",
          Config("magnets_3333", CACHED), Config("abrupt_6006", CACHED), "better"),
    Claim("d", "no refresh is worse than refresh on switch",
          Config("magnets_3333", "no_refresh"), Config("magnets_3333", CACHED), "worse"),
    *(
        Claim(f"e (m_{p})", f"progressive distillation beats none at width 1/{p}",
              Config(f"m{p}_12", "none", "progressive"), Config(f"m{p}_12", "none", "none"), "better", width=p)
        for p in (8, 4, 2)
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Measured:
    """One configuration's distance over its seeds: mean, sample std (NaN for one seed), their number, GFLOPs, rFID and
    the held-out CE of its model at a width (NaN where not asked or not found)."""

    mean: float
    std: float
    n: int
    gflops: float
    rfid: float
    checkpoint: str
    held_out_ce: float = math.nan


REQUIRED_COLUMNS = ("extractor", "aggregate", "samples", "fid", "fvd", "distill", "schedule", "cache", "guidance",
                    "widths", "seed", "checkpoint", "gflops_per_sample", "rfid")  # fmt: skip
"""The columns of a results file (:data:`magnets.results.RESULT_COLUMNS`) the claims read; ``policy`` and
``steps_per_width`` may be missing (files written before they existed)."""


IDENTITY_COLUMNS = ("checkpoint_sha256", "tokenizer_sha256", "tokenizer_check", "extractor_sha256", "classifier_sha256")
"""The provenance columns (read as text: an identity of digits only is not a number); absent in files of earlier
versions, empty in their rows."""


def read_results(path: Path) -> pd.DataFrame:
    """A results file, or :class:`ValueError` saying in one line why it cannot be one: missing, empty, not UTF-8 text,
    not CSV, or missing some of :data:`REQUIRED_COLUMNS` (named)."""
    if not path.is_file():
        raise ValueError(f"no results file at {path}: run magnets.evaluate with seeds=[...] first")
    try:
        results = pd.read_csv(path, encoding="utf-8", dtype=dict.fromkeys(IDENTITY_COLUMNS, str))
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: not a results file written by magnets.evaluate") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): not a results file") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path} is not a readable CSV ({str(err).strip()})") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in results.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)} of a results file written by magnets.evaluate "
            f"(its columns: {', '.join(map(str, results.columns))})"
        )
    return results


def seed_rows(results: pd.DataFrame, extractor: str, samples: int | None) -> pd.DataFrame:
    """The rows of one seed each (not the ``mean``/``std`` rows) at ``extractor`` and ``samples`` (default: the largest
    count evaluated with that extractor), the newest row of each configuration, checkpoint and seed kept, with the
    Fréchet distance as ``distance``."""
    rows = results[(results["extractor"] == extractor) & (results["aggregate"].fillna("") == "")].copy()
    if rows.empty:
        found = sorted(results["extractor"].dropna().unique())
        raise ValueError(f"no seed rows with extractor {extractor!r} in the results; extractors present: {found}")
    if samples is None:
        samples = int(rows["samples"].max())
    rows = rows[rows["samples"] == samples]
    if rows.empty:
        raise ValueError(f"no {extractor} rows of {samples} samples; counts present: {sorted(results['samples'].unique())}")
    rows["distance"] = rows["fid"].where(rows["fid"].notna(), rows["fvd"])
    # Results written before decode policies existed have no policy column: every row is a plain decode.
    rows["policy"] = rows["policy"].fillna("").astype(str) if "policy" in rows else ""
    rows["order"] = range(len(rows))
    rows = rows.drop_duplicates([*CONFIG_COLUMNS, "checkpoint", "seed"], keep="last")
    check_one_source(rows, extractor)
    return rows


def check_one_source(rows: pd.DataFrame, extractor: str) -> None:
    """Refuse seed rows that are not comparable: decoded by more than one tokenizer or measured by more than one set of
    extractor weights (by their recorded identities; rows of earlier versions record none), or decoded with a tokenizer
    other than their checkpoint's (``tokenizer_check`` ``override``)."""
    for column, what in (("tokenizer_sha256", "tokenizers"), ("extractor_sha256", "extractor weights")):
        if column not in rows:
            continue
        found = sorted({value for value in rows[column].fillna("").astype(str) if value})
        if len(found) > 1:
            raise ValueError(
                f"the {extractor} rows come from {len(found)} {what} (sha256 {', '.join(found)}): their distances do not "
                f"compare; evaluate each into its own results= file"
            )
    if "tokenizer_check" in rows:
        overridden = int((rows["tokenizer_check"].fillna("") == "override").sum())
        if overridden:
            raise ValueError(
                f"{overridden} {extractor} row(s) decoded with a tokenizer other than their checkpoint's (tokenizer_check="
                "override, from allow_tokenizer_mismatch=true): the claims compare rows of matching tokenizers only"
            )


def held_out_ce(checkpoint: str, width: int) -> float:
    """The held-out masked-token CE at width 1/``width`` in the ``metrics.json`` of the run that saved ``checkpoint``
    (``<run>/checkpoints/last.ckpt``); NaN when that file or key is missing."""
    metrics = Path(checkpoint).parent.parent / "metrics.json"
    if not metrics.is_file():
        return math.nan
    return float(json.loads(metrics.read_text()).get(f"val/loss/p{width}", math.nan))


def measure(rows: pd.DataFrame, config: Config, width: int | None = None) -> Measured | None:
    """``config``'s seeds in ``rows`` (of its newest checkpoint: the one of the last row written), or None if absent."""
    match = rows[
        (rows["schedule"] == config.schedule)
        & (rows["cache"] == config.cache)
        & (rows["distill"] == config.distill)
        & (rows["guidance"].astype(float) == config.guidance)
        & (rows["policy"] == config.policy)
    ]
    if match.empty:
        return None
    checkpoint = str(match.sort_values("order")["checkpoint"].iloc[-1])
    match = match[match["checkpoint"] == checkpoint]
    distances = match["distance"].astype(float)
    return Measured(
        mean=float(distances.mean()),
        std=float(distances.std(ddof=1)) if len(match) > 1 else math.nan,
        n=len(match),
        gflops=float(match["gflops_per_sample"].astype(float).mean()),
        rfid=float(match["rfid"].astype(float).mean()),
        checkpoint=checkpoint,
        held_out_ce=held_out_ce(checkpoint, width) if width is not None else math.nan,
    )


def standard_error(candidate: Measured, baseline: Measured, baseline_factor: float = 1.0) -> float:
    """Standard error of ``candidate.mean - baseline_factor * baseline.mean`` (NaN when a side has one seed)."""
    return math.sqrt(candidate.std**2 / candidate.n + (baseline_factor * baseline.std) ** 2 / baseline.n)


def verdict(claim: Claim, candidate: Measured, baseline: Measured) -> tuple[str, str]:
    """``(verdict, why)`` of ``claim`` from the two measurements (see the module docstring)."""
    if claim.test == "within":
        excess = candidate.mean - (1 + FID_MARGIN) * baseline.mean  # > 0: outside the margin
        se = standard_error(candidate, baseline, 1 + FID_MARGIN)
        ratio = baseline.gflops / candidate.gflops
        excess_percent = 100 * (candidate.mean / baseline.mean - 1)
        gap = f"FID {excess_percent:+.1f}% (limit +{100 * FID_MARGIN:.0f}%), {ratio:.2f}x fewer GFLOPs"
        if ratio < GFLOPS_RATIO:
            return "fails", f"{gap}: below {GFLOPS_RATIO}x"
        if math.isnan(se):
            return ("holds" if excess <= 0 else "fails"), f"{gap}; one seed: no standard error"
        if excess > SIGNIFICANCE_SE * se:
            return "fails", f"{gap}: over the margin by {excess:.2f} > 2 SE ({SIGNIFICANCE_SE * se:.2f})"
        if excess < -SIGNIFICANCE_SE * se:
            return "holds", f"{gap}: under the margin by {-excess:.2f} > 2 SE ({SIGNIFICANCE_SE * se:.2f})"
        return "not resolved", f"{gap}: within 2 SE ({SIGNIFICANCE_SE * se:.2f}) of the margin"
    sign = -1.0 if claim.test == "better" else 1.0  # the claimed sign of candidate - baseline
    difference = candidate.mean - baseline.mean
    se = standard_error(candidate, baseline)
    gap = f"difference {difference:+.2f}"
    if math.isnan(se):
        return ("holds" if sign * difference > 0 else "fails"), f"{gap}; one seed: no standard error"
    if abs(difference) <= SIGNIFICANCE_SE * se:
        return "not resolved", f"{gap} within 2 SE ({SIGNIFICANCE_SE * se:.2f})"
    return ("holds" if sign * difference > 0 else "fails"), f"{gap}, 2 SE {SIGNIFICANCE_SE * se:.2f}"


def claims_table(results: pd.DataFrame, extractor: str = "inception_offline", samples: int | None = None) -> pd.DataFrame:
    """A row per claim (see :data:`CLAIMS`): both sides' mean, std and seeds, GFLOPs, held-out CE for (e), rFID, the
    verdict and why."""
    rows = seed_rows(results, extractor, samples)
    table = []
    for claim in CLAIMS:
        candidate = measure(rows, claim.candidate, claim.width)
        baseline = measure(rows, claim.baseline, claim.width)
        row: dict[str, Any] = {
            "claim": claim.key,
            "statement": claim.statement,
            "candidate": claim.candidate.label(),
            "baseline": claim.baseline.label(),
        }
        for side, measured in (("candidate", candidate), ("baseline", baseline)):
            row |= {
                f"{side}_mean": measured.mean if measured else math.nan,
                f"{side}_std": measured.std if measured else math.nan,
                f"{side}_seeds": measured.n if measured else 0,
                f"{side}_gflops": measured.gflops if measured else math.nan,
                f"{side}_held_out_ce": measured.held_out_ce if measured else math.nan,
            }
        measured_sides = [m for m in (candidate, baseline) if m is not None]
        row["rfid"] = measured_sides[0].rfid if measured_sides else math.nan
        if candidate is None or baseline is None:
            missing = [c.label() for c, m in ((claim.candidate, candidate), (claim.baseline, baseline)) if m is None]
            row["verdict"], row["why"] = "not measured", f"no {extractor} rows of {' and '.join(missing)}"
        else:
            row["verdict"], row["why"] = verdict(claim, candidate, baseline)
        table.append(row)
    return pd.DataFrame(table)


def is_static(widths: str, steps_per_width: str = "") -> bool:
    """Whether a schedule runs one width for every step (plain MaskGIT at some K, or one sub-model alone), from the
    results' ``widths`` and ``steps_per_width`` ("8-4-2-1", "0-0-0-4"): a searched schedule with every step at one
    width (``search_0-0-0-4`` is ``maskgit_4``) is static too. Without the steps, only a single width is."""
    steps = [s for s in steps_per_width.split("-") if s.strip() not in ("", "nan")]
    if steps and len(steps) == len(widths.split("-")):
        return sum(int(float(s)) > 0 for s in steps) <= 1
    return "-" not in widths


CONFIGURATION_COLUMNS = ["schedule", "cache", "policy", "guidance", "widths", "static", "mean", "std", "n", "gflops"]


def configurations(rows: pd.DataFrame, distill: str = "progressive", guided: bool = False) -> pd.DataFrame:
    """Every schedule, cache mode and decode policy of the ``distill`` model in ``rows`` (of :func:`seed_rows`), at
    guidance 0 (``guided``: at every guidance): its ``widths``, whether it is ``static`` (:func:`is_static`, one width
    for every step and no policy; a guided static decode runs both of its passes at that width, so it is a static
    point of the guided front), and the :class:`Measured` fields over its seeds."""
    table = []
    model_rows = rows[rows["distill"] == distill]
    if not guided:
        model_rows = model_rows[model_rows["guidance"].astype(float) == 0.0]
    for (schedule, cache, policy, guidance), group in model_rows.groupby(["schedule", "cache", "policy", "guidance"]):
        config = Config(str(schedule), str(cache), distill, str(policy), float(guidance))
        measured = measure(rows, config)
        if measured is None:  # every row of the group was written for another checkpoint's configuration
            continue
        widths = str(group["widths"].iloc[-1])
        steps = str(group["steps_per_width"].iloc[-1]) if "steps_per_width" in group else ""
        static = is_static(widths, steps) and not policy
        table.append({"schedule": schedule, "cache": cache, "policy": policy, "guidance": float(guidance),
                      "widths": widths, "static": static, "mean": measured.mean, "std": measured.std, "n": measured.n,
                      "gflops": measured.gflops})  # fmt: skip
    return pd.DataFrame(table, columns=CONFIGURATION_COLUMNS)


def against_front(candidates: pd.DataFrame, front: pd.DataFrame, name: str) -> pd.DataFrame:
    """Each candidate configuration (rows of :func:`configurations`) against the best configuration of ``front`` (the
    lowest mean distance) of at most its GFLOPs: that one as ``best_<name>`` (``_gflops``, ``_mean``, ``_std``), the
    difference and two standard errors of it, and where the candidate lies: ``below`` the front (better by more than
    2 SE), ``above`` it (worse by more than 2 SE), ``on`` it (within 2 SE), or ``cheapest`` (nothing in ``front`` is as
    cheap). With one seed on either side there is no standard error: the position is the difference's sign."""
    best_columns = {f"best_{name}": "", f"best_{name}_gflops": math.nan, f"best_{name}_mean": math.nan,
                    f"best_{name}_std": math.nan}  # fmt: skip
    table = []
    for _, candidate in candidates.sort_values("gflops").iterrows():
        row = {"schedule": candidate["schedule"], "cache": candidate["cache"], "policy": candidate["policy"],
               "guidance": candidate["guidance"], "gflops": candidate["gflops"], "mean": candidate["mean"],
               "std": candidate["std"], "n": candidate["n"]}  # fmt: skip
        cheaper = front[front["gflops"] <= candidate["gflops"]]
        if cheaper.empty:
            table.append(row | best_columns | {"difference": math.nan, "two_se": math.nan, "position": "cheapest"})
            continue
        best = cheaper.loc[cheaper["mean"].idxmin()]
        difference = candidate["mean"] - best["mean"]
        two_se = SIGNIFICANCE_SE * math.sqrt(candidate["std"] ** 2 / candidate["n"] + best["std"] ** 2 / best["n"])
        if math.isnan(two_se):
            position = "below" if difference < 0 else "above"
        else:
            position = "below" if difference < -two_se else "above" if difference > two_se else "on"
        best_label = config_label(best["schedule"], best["cache"], best["policy"], best["guidance"])
        table.append(row | {f"best_{name}": best_label, f"best_{name}_gflops": best["gflops"],
                            f"best_{name}_mean": best["mean"], f"best_{name}_std": best["std"], "difference": difference,
                            "two_se": two_se, "position": position})  # fmt: skip
    columns = ["schedule", "cache", "policy", "guidance", "gflops", "mean", "std", "n", *best_columns, "difference",
               "two_se", "position"]  # fmt: skip
    return pd.DataFrame(table, columns=columns)


def front_table(results: pd.DataFrame, extractor: str = "inception_offline", samples: int | None = None) -> pd.DataFrame:
    """Each nested-schedule configuration against the static front (:func:`against_front`): the best static
    configuration (one width for every step) of at most its GFLOPs, as ``best_static``."""
    configs = configurations(seed_rows(results, extractor, samples))
    return against_front(configs[~configs["static"]], configs[configs["static"]], "static")


def is_scale_up(widths: str) -> bool:
    """Whether a schedule's widths ("8-4-2-1") run smallest first and never narrow again: MaGNeTS' order."""
    factors = [int(float(w)) for w in widths.split("-") if w.strip()]
    return all(a > b for a, b in zip(factors, factors[1:], strict=False))


def policies_table(results: pd.DataFrame, extractor: str = "inception_offline", samples: int | None = None) -> pd.DataFrame:
    """Each decode policy beyond the paper's (a ``policy`` — routing, partial refresh, guidance apart — or a schedule
    order other than scale-up: sandwich, scale-down) against the static front (:func:`against_front`), guided rows
    included: ``below`` answers whether a policy puts a nested decode beyond the best static configuration as cheap.
    A policy decoding at guidance w meets the static decodes at guidance 0 and at w (plain guidance, both passes at one
    width): a cheaper-guidance policy is measured against guidance itself, not credited with what guidance alone
    gives, and an unguided one against the unguided front."""
    configs = configurations(seed_rows(results, extractor, samples), guided=True)
    order = ~configs["widths"].astype(str).map(is_scale_up) & ~configs["static"]
    candidates = configs[(configs["policy"] != "") | order]
    static = configs[configs["static"]]
    tables = [
        against_front(group, static[static["guidance"].isin((0.0, guidance))], "static")
        for guidance, group in candidates.groupby("guidance")
    ]
    if not tables:
        return against_front(candidates, static, "static")
    return pd.concat(tables).sort_values("gflops", kind="stable").reset_index(drop=True)


SEARCHED_PREFIX = "search_"
"""The schedule search's schedules are named ``search_<k_8>-<k_4>-<k_2>-<k_1>`` (``conf/schedule/search.yaml``)."""


def search_table(results: pd.DataFrame, extractor: str = "inception_offline", samples: int | None = None) -> pd.DataFrame:
    """Each searched configuration (the schedule search's trials, static ones included) against the shipped
    schedules' front (:func:`against_front`): the best shipped configuration, static or nested, of at most its GFLOPs,
    as ``best_shipped``. ``below`` or ``on`` answers whether the search found a schedule beyond or on that front."""
    configs = configurations(seed_rows(results, extractor, samples))
    searched = configs["schedule"].astype(str).str.startswith(SEARCHED_PREFIX)
    return against_front(configs[searched], configs[~searched], "shipped")


DISTILL_MODES = ("progressive", "none", "single")
"""The distillation ablation's models: nested with progressive distillation, nested on ground truth only, and one
single-width model per width trained alone (the ``distill`` column of the results)."""
DISTILL_WIDTHS = (8, 4, 2, 1)
NESTED_SCHEDULE = Config("magnets_3333", CACHED)
"""The nested schedule the ablation also reports for the two nested models."""


def width_schedule(width: int) -> str:
    """The static 12-step schedule of one width: ``m{p}_12``, or ``maskgit_12`` for the full width."""
    return "maskgit_12" if width == 1 else f"m{width}_12"


def distillation_table(results: pd.DataFrame, extractor: str = "inception_offline", samples: int | None = None) -> pd.DataFrame:
    """The distillation ablation, a row per model (``distill``: progressive, none, single) and width: the held-out CE
    of that model at that width and the distance of its 12 uncached steps at that width alone (mean, std, seeds,
    GFLOPs); then ``magnets_3333`` cached for the two nested models (``width`` 0, no CE). Missing ones are NaN."""
    rows = seed_rows(results, extractor, samples)
    wanted = [(mode, width, Config(width_schedule(width), "none", mode)) for width in DISTILL_WIDTHS for mode in DISTILL_MODES]
    wanted += [(mode, 0, Config(NESTED_SCHEDULE.schedule, NESTED_SCHEDULE.cache, mode)) for mode in DISTILL_MODES[:2]]
    table = []
    for mode, width, config in wanted:
        measured = measure(rows, config, width or None)
        table.append({
            "distill": mode, "width": width, "schedule": config.schedule, "cache": config.cache,
            "mean": measured.mean if measured else math.nan, "std": measured.std if measured else math.nan,
            "n": measured.n if measured else 0, "gflops": measured.gflops if measured else math.nan,
            "held_out_ce": measured.held_out_ce if measured else math.nan,
            "checkpoint": measured.checkpoint if measured else "",
        })  # fmt: skip
    return pd.DataFrame(table)


def distillation_markdown(table: pd.DataFrame, extractor: str) -> str:
    """The distillation ablation as GitHub markdown: a line per width (then ``magnets_3333`` cached), and for each
    model its held-out CE and distance (mean ± std over the seeds)."""
    header = " | ".join(f"{mode} CE | {mode} {extractor}" for mode in DISTILL_MODES)
    lines = [f"| sub-model (schedule, cache) | {header} |", "|---" * (1 + 2 * len(DISTILL_MODES)) + "|"]
    for (width, schedule, cache), group in table.groupby(["width", "schedule", "cache"], sort=False):
        cells = []
        for mode in DISTILL_MODES:
            row = group[group["distill"] == mode]
            if row.empty:
                cells += ["–", "–"]
                continue
            row = row.iloc[0]
            cells.append("–" if math.isnan(row["held_out_ce"]) else f"{row['held_out_ce']:.3f}")
            if row["n"] == 0:
                cells.append("–")
            else:
                spread = "" if math.isnan(row["std"]) else f" ± {row['std']:.2f}"
                cells.append(f"{row['mean']:.2f}{spread} ({row['n']})")
        name = f"m_{width}" if width else "nested"
        lines.append(f"| {name} ({schedule}, {cache}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def front_markdown(front: pd.DataFrame, extractor: str, candidates: str = "nested", reference: str = "static") -> str:
    """A front comparison (:func:`front_table`, or :func:`search_table` with ``candidates="searched"`` and
    ``reference="shipped"``) as GitHub markdown, closing with the counts below and on the front."""

    def spread(mean: float, std: float) -> str:
        return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"

    lines = [
        f"| {candidates} schedule | GFLOPs | {extractor} (seeds) | best {reference} at ≤ its GFLOPs | its GFLOPs "
        f"| its {extractor} | difference (2 SE) | position |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, row in front.iterrows():
        if row["position"] == "cheapest":
            best = "– | – | –"
            difference = "–"
        else:
            spread_best = spread(row[f"best_{reference}_mean"], row[f"best_{reference}_std"])
            best = f"{row[f'best_{reference}']} | {row[f'best_{reference}_gflops']:.3f} | {spread_best}"
            two_se = "one seed: by sign" if math.isnan(row["two_se"]) else f"{row['two_se']:.2f}"
            difference = f"{row['difference']:+.2f} ({two_se})"
        lines.append(
            f"| {config_label(row['schedule'], row['cache'], row['policy'], row['guidance'])} | {row['gflops']:.3f} "
            f"| {spread(row['mean'], row['std'])} ({row['n']}) "
            f"| {best} | {difference} | **{row['position']}** |"
        )
    below = int((front["position"] == "below").sum())  # against_front always has the column, rows or none
    on = int((front["position"] == "on").sum())
    lines.append(
        f"\n{below} of {len(front)} {candidates}-schedule configurations lie strictly below the {reference} front, "
        f"{on} on it (within 2 SE)."
    )
    return "\n".join(lines) + "\n"


def claims_markdown(table: pd.DataFrame, extractor: str) -> str:
    """The claims table as GitHub markdown: one line per claim, means ± std (seeds), GFLOPs, rFID, verdict."""

    def side(row: pd.Series, which: str) -> str:
        if row[f"{which}_seeds"] == 0:
            return "–"
        spread = "" if math.isnan(row[f"{which}_std"]) else f" ± {row[f'{which}_std']:.2f}"
        ce = row[f"{which}_held_out_ce"]
        held_out = "" if math.isnan(ce) else f", CE {ce:.3f}"
        return f"{row[f'{which}_mean']:.2f}{spread} ({row[f'{which}_gflops']:.3f} GFLOPs{held_out})"

    lines = [
        f"| claim | candidate | baseline | candidate {extractor} | baseline {extractor} | rFID | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        rfid = "–" if math.isnan(row["rfid"]) else f"{row['rfid']:.2f}"
        lines.append(
            f"| **{row['claim']}** {row['statement']} | {row['candidate']} | {row['baseline']} | {side(row, 'candidate')} "
            f"| {side(row, 'baseline')} | {rfid} | **{row['verdict']}**: {row['why']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magnets.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results.csv written by magnets.evaluate")
    parser.add_argument("--extractor", default="inception_offline", help="the feature extractor of the rows to use")
    parser.add_argument("--samples", type=int, default=None, help="the sample count of the rows (default: the largest)")
    args = parser.parse_args(argv)
    try:
        results = read_results(args.results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        table = claims_table(results, args.extractor, args.samples)
    except (ValueError, KeyError) as err:
        print(f"error: {args.results}: {err}", file=sys.stderr)
        return 2
    front = front_table(results, args.extractor, args.samples)
    distillation = distillation_table(results, args.extractor, args.samples)
    search = search_table(results, args.extractor, args.samples)
    policies = policies_table(results, args.extractor, args.samples)
    claims_csv = args.results.with_name(f"claims_{args.extractor}.csv")
    front_csv = args.results.with_name(f"front_{args.extractor}.csv")
    distillation_csv = args.results.with_name(f"distillation_{args.extractor}.csv")
    claims_md = args.results.with_name(f"claims_{args.extractor}.md")
    atomic_write(claims_csv, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(front_csv, lambda tmp: front.to_csv(tmp, index=False))
    atomic_write(distillation_csv, lambda tmp: distillation.to_csv(tmp, index=False))
    sections = [claims_markdown(table, args.extractor), front_markdown(front, args.extractor),
                distillation_markdown(distillation, args.extractor)]  # fmt: skip
    written = [claims_csv.name, front_csv.name, distillation_csv.name]
    if not search.empty:  # the schedule search ran at this extractor and sample count
        search_csv = args.results.with_name(f"search_{args.extractor}.csv")
        atomic_write(search_csv, lambda tmp: search.to_csv(tmp, index=False))
        sections.append(front_markdown(search, args.extractor, candidates="searched", reference="shipped"))
        written.append(search_csv.name)
    if not policies.empty:  # decode policies ran at this extractor and sample count
        policies_csv = args.results.with_name(f"policies_{args.extractor}.csv")
        atomic_write(policies_csv, lambda tmp: policies.to_csv(tmp, index=False))
        sections.append(front_markdown(policies, args.extractor, candidates="policy", reference="static"))
        written.append(policies_csv.name)
    markdown = "\n".join(sections)
    atomic_write_text(claims_md, markdown)
    print(markdown, end="")
    print(f"wrote {args.results.parent}: {', '.join(written)} and {claims_md.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
