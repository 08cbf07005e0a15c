"""Evaluate one decode configuration of a checkpoint: FID or FVD, Inception Score, class accuracy, GFLOPs and the
tokenizer's rFID; a row per seed (and, with several seeds, their mean and std rows) appended to a results CSV.

    python -m magnets.evaluate [name=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
        [seeds=[0,1,2] | repeats=3] [decode.guidance_scale=...]
        [samples=2000] [extractor=inception_offline | domain | i3d_torchscript extractor.path=FILE]
        [reference.npz=VIRTUAL_imagenet256_labeled.npz] [chunk_size=1000] [export_npz=samples.npz]
    make sweep EXP=fmnist SWEEP=schedules|cache|guidance        (Hydra multirun over conf/sweep/<SWEEP>.yaml)

The real side of the Fréchet distance is the statistics file ``reference.npz``
when given (ADM's reference batches, e.g. ``VIRTUAL_imagenet256_labeled.npz``
for the paper's ImageNet 256 protocol of 50,000 samples, or a file of
``FeatureStats.save``), else ``reference.count`` items of ``reference.split``,
their statistics cached in ``<paths.runs>/fid_stats`` per dataset, frames and
resolution, split, count, extractor and weights. Images give FID, clips FVD;
with the ``domain`` extractor (the run's own classifier) they are FID-domain /
FVD-domain, comparable between rows of one experiment but not to published
numbers. The Inception Score is of the extractor's logits: the published
one with ``inception_fidelity``; NaN with ``inception_offline``, whose
network ends at the pool features; in the project's classifier's classes
with ``domain`` (comparable within an experiment only). Class accuracy is the run's classifier's accuracy on
the samples against the classes asked for (under frame prediction, the real
clips' classes; the clips come from the reference split's token shard).

Samples are generated in chunks of ``chunk_size``, each written as it is
done to ``<samples_dir>/<key>/chunk-00000.npz`` ..., the key a hash of
everything that determines them (checkpoint and tokenizer sha256, task,
schedule, decode settings, seed, batch and chunk size, device type; see the
folder's ``settings.json``). Each chunk's decode is seeded from (seed,
chunk), so a rerun of an interrupted evaluation skips the chunks on disk and
ends with the samples and row of an unbroken one (on a GPU, up to its
kernels' nondeterminism); a later run of more samples, or with another
extractor or reference, reuses them too. The rows go to ``results`` (default
``<paths.runs>/<name>/results.csv``) in one append under a file lock, so
parallel multirun jobs can share the file.

Seeds: ``seeds=[s0, s1, ...]``, or ``repeats=R`` for ``seed .. seed+R-1``
(``seeds`` wins; a ``repeats`` beside it must be its length), evaluate each
seed's samples (its own chunk folder) against one reference, a row per seed
(``seed``), then with two or more seeds a ``mean`` and a ``std`` (ddof=1) row
(``aggregate``; ``n_seeds`` their number) of every numeric metric column.
``rfid`` is the tokenizer's reconstruction FID (FVD): the first
``reference.count`` items of ``reference.split`` encoded and decoded, their
features against the same reference (``reference.npz``'s when given), cached
in ``<paths.runs>/fid_stats/rfid__*.json``; no generated sample can do
better. ``main`` returns ``(frechet, gflops_per_sample)`` (the means over
seeds) for a Hydra sweeper to minimise.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from magnets.cli import (
    check_choice,
    check_evaluate_config,
    check_policy_fits,
    check_positive_int,
    check_schedule,
    run_entry,
)
from magnets.data.shards import TokenDataset
from magnets.decoding.loop import DECODE_DTYPES, SamplingSettings
from magnets.decoding.policies import policy_label, policy_slug, route_settings
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError
from magnets.evaluation import (
    GeneratedBatch,
    SampleChunks,
    chunk_generator,
    chunked_samples,
    decode_conditions,
    export_adm_npz,
    generate_samples,
    grid_columns,
    measure_samples,
    media_key,
    reference_items,
    split_reference,
)
from magnets.files import atomic_write_text, file_sha256
from magnets.lit.maskgit import load_maskgit
from magnets.lit.tokenizer import load_tokenizer
from magnets.media import save_media
from magnets.metrics.extractors import (
    check_extractor_fits,
    domain_classifier_features,
    extractor_from_config,
    frechet_label,
    frechet_metric_name,
)
from magnets.metrics.fid import FeatureExtractor, FeatureStats
from magnets.metrics.reconstruction import reconstruction_fid, rfid_cache_path
from magnets.models.tokenizer import Tokenizer
from magnets.provenance import check_tokenizer_identity, identity, short
from magnets.runs import check_tokenizer_fits_model, resolve_checkpoint, shard_dir, tokenizer_of_run
from magnets.task import Task

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


def run_classifier(run_config: dict[str, Any], cfg: DictConfig) -> Path:
    """The domain classifier: ``cfg.classifier``, or the one the run trained (its config's ``classifier.path``)."""
    if cfg.classifier is not None:
        return Path(cfg.classifier)
    path = run_config.get("classifier", {}).get("path")
    if path is None:
        raise ConfigError("classifier", None, "a classifier checkpoint path: the run's config names none")
    return Path(path)


def build_feature_extractor(name: str, path: str | None, classifier: Path, device: torch.device) -> FeatureExtractor:
    """The extractor ``name`` with its file ``path`` (:func:`~magnets.metrics.extractors.extractor_from_config`), on
    ``device`` in eval mode."""
    return extractor_from_config(name, path, classifier).to(device).eval()


def real_reference(run_config: dict[str, Any], cfg: DictConfig, extractor: FeatureExtractor) -> FeatureStats:
    """``reference.npz``'s statistics when given, else the cached ones of the first ``reference.count`` items of the
    real ``reference.split`` (all of it when it has fewer; the cache file is named by the count asked for)."""
    return split_reference(
        run_config["data"], cfg.reference.split, cfg.reference.count, cfg.reference.npz, extractor,
        Path(cfg.paths.runs, "fid_stats"), cfg.batch_size,
    )  # fmt: skip


def reference_description(reference: FeatureStats, cfg: DictConfig) -> str:
    """What the real side is, for the results row: the statistics file's name, or ``<split>-<count>``."""
    if cfg.reference.npz is not None:
        return Path(cfg.reference.npz).name
    return f"{cfg.reference.split}-{reference.count}"


def condition_shard(task: Task, run_config: dict[str, Any], cfg: DictConfig) -> TokenDataset | None:
    """Frame prediction's real clips (the reference split's token shard) that samples decode from; None for other tasks."""
    if not task.given_tokens:
        return None
    return TokenDataset(shard_dir(run_config["tokenize"]["out_dir"], cfg.reference.split))


def sample_settings(
    checkpoint: Path,
    tokenizer: Path,
    task: Task,
    schedule_name: str,
    width_per_step: list[int],
    seed: int,
    cfg: DictConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Everything that determines the generated samples but their count: the key of their chunk folder."""
    return {
        "checkpoint_sha256": file_sha256(checkpoint),
        "tokenizer_sha256": file_sha256(tokenizer),
        "task": task.name,
        "conditions": cfg.reference.split if task.given_tokens else "balanced_classes",
        "schedule": schedule_name,
        "width_per_step": list(width_per_step),
        "decode": OmegaConf.to_container(cfg.decode, resolve=True),
        "seed": seed,
        "batch_size": cfg.batch_size,  # each batch draws its own random numbers: another size, other samples
        "device": device.type,  # CPU and GPU draw other random numbers from one seed
        "dtype": cfg.dtype,
    }


def evaluation_seeds(cfg: DictConfig) -> list[int]:
    """The seeds to evaluate: ``seeds`` when given (``repeats``, if also set, must be its length), else ``repeats``
    consecutive seeds from ``seed``, else ``[seed]``."""
    seeds, repeats = cfg.seeds, cfg.repeats
    if repeats is not None:
        check_positive_int("repeats", repeats)
    if seeds is None:
        return [cfg.seed] if repeats is None else list(range(cfg.seed, cfg.seed + repeats))
    seeds = list(seeds) if isinstance(seeds, ListConfig | list | tuple) else seeds
    valid = "null or a non-empty list of distinct integers, e.g. [0, 1, 2]"
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError("seeds", seeds, valid)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", seeds, f"{valid} (a seed twice would count its samples twice)")
    if repeats is not None and repeats != len(seeds):
        raise ConfigError("repeats", repeats, f"null or {len(seeds)}, the number of seeds={seeds} (seeds wins when both are set)")
    return seeds


def check_config(cfg: DictConfig) -> None:
    """Everything ``python -m magnets.evaluate`` reads, before any model is loaded."""
    check_evaluate_config(cfg)
    evaluation_seeds(cfg)
    check_choice("rfid", cfg.rfid, [True, False])


def tokenizer_rfid(
    tokenizer: Tokenizer,
    tokenizer_path: Path,
    data_cfg: dict[str, Any],
    extractor: FeatureExtractor,
    reference: FeatureStats,
    description: str,
    cfg: DictConfig,
) -> float:
    """The rFID (rFVD for clips) of the tokenizer: the reference split's first ``reference.count`` real items encoded and
    decoded, against ``reference`` (also under ``reference.npz``); NaN with ``rfid=false`` or pre-tokenized data. The floor
    of the row's FID."""
    if not cfg.rfid:
        return float("nan")
    if data_cfg.get("pretokenized", False):
        log.info("no rFID: the run's data %r is pre-tokenized, there are no real items to reconstruct", data_cfg["name"])
        return float("nan")
    items = reference_items(data_cfg, cfg.reference.split, cfg.reference.count, cfg.batch_size)
    split = f"{cfg.reference.split}-{cfg.reference.count}"
    cache_dir = Path(cfg.paths.runs, "fid_stats")
    cache_path = rfid_cache_path(cache_dir, file_sha256(tokenizer_path), extractor, media_key(data_cfg), split, description)
    return reconstruction_fid(tokenizer, items, extractor, reference, cache_path=cache_path)


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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``cfg.samples`` samples (chunked, resumable) per seed with the configured schedule and cache; append a row per
    seed (and with several seeds their mean and std rows); return the seed's row, or with several seeds the mean row."""
    seeds = evaluation_seeds(cfg)
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, task, run_config, provenance = load_maskgit(checkpoint, device)
    model = model.to(DECODE_DTYPES[cfg.dtype])
    schedule = load_schedule(cast(dict[str, Any], OmegaConf.to_container(cfg.schedule, resolve=True)))
    check_schedule(cfg.schedule, model.cfg.widths)  # the checkpoint's widths: a single-width one takes no nested schedule
    width_per_step = schedule.width_per_step(model.cfg.widths)
    check_policy_fits(cfg.decode, model.cfg.widths, model.cfg.depth)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = Path(cfg.tokenizer_checkpoint or tokenizer_of_run(run_config, checkpoint, cfg.paths.runs))
    tokenizer = cast(Tokenizer, load_tokenizer(tokenizer_path, device))
    check_tokenizer_fits_model(tokenizer.codebook_size, tokenizer.grid, tokenizer_path, model.cfg, checkpoint)
    recorded = provenance.get("tokenizer_sha256")
    tokenizer_id, tokenizer_check = check_tokenizer_identity(recorded, tokenizer_path, checkpoint, cfg.allow_tokenizer_mismatch)
    if tokenizer_check == "unrecorded":
        log.warning("%s records no tokenizer (written before checkpoints did): rows say tokenizer_check=unrecorded", checkpoint)
    classifier_path = run_classifier(run_config, cfg)
    # Class accuracy needs the run's classifier; a run without one (ImageNet) is measured with another extractor only.
    has_classifier = classifier_path.is_file() or cfg.extractor.name == "domain"
    classifier = domain_classifier_features(classifier_path).to(device).eval() if has_classifier else None
    extractor = build_feature_extractor(cfg.extractor.name, cfg.extractor.path, classifier_path, device)
    if classifier is not None:
        check_extractor_fits(extractor, classifier)
    reference = real_reference(run_config, cfg, extractor)  # once: every seed is measured against the same statistics
    described = reference_description(reference, cfg)
    rfid = tokenizer_rfid(tokenizer, tokenizer_path, run_config["data"], extractor, reference, described, cfg)
    shard = condition_shard(task, run_config, cfg)
    num_classes = model.cfg.num_classes
    policy = policy_label(cfg.decode)
    description = f"{schedule.name}/{cfg.decode.cache}/w={settings.guidance_scale:g}" + (f"/{policy}" if policy else "")
    columns = grid_columns(task, num_classes)
    unit = "clip" if extractor.media_kind == "video" else "img"
    metric = frechet_metric_name(extractor)
    results = Path(cfg.results)
    commit = git_commit()

    def measure_seed(seed: int) -> tuple[dict[str, Any], SampleChunks]:
        """One seed's samples (their own chunk folder: the seed is part of the key) measured: its row and chunks."""
        key = sample_settings(checkpoint, tokenizer_path, task, schedule.name, width_per_step, seed, cfg, device)
        chunks = SampleChunks.keyed(cfg.samples_dir, key, cfg.samples, cfg.chunk_size)
        finished = sum(chunks.is_finished(chunk) for chunk in range(len(chunks)))
        log.info("seed %d: samples in %s: %d of %d chunks of %d already written", seed, chunks.folder, finished, len(chunks),
                 cfg.chunk_size)  # fmt: skip

        def generate(chunk: int) -> Iterator[GeneratedBatch]:
            indices = chunks.indices(chunk)
            conditions = decode_conditions(task, len(indices), num_classes, device, shard, start=indices.start)
            return generate_samples(
                model, tokenizer, task, conditions, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every,
                cfg.batch_size, chunk_generator(seed, chunk, device), compile=cfg.decode.compile, fast=cfg.decode.fast,
                refresh_layer=cfg.decode.refresh_layer, route=route_settings(cfg.decode),
            )  # fmt: skip

        with tqdm(total=cfg.samples, desc=f"{description} seed {seed}", unit=unit, dynamic_ncols=True) as bar:
            quality = measure_samples(
                chunked_samples(chunks, generate, cfg.batch_size), model, extractor, reference,
                cast(Callable[[torch.Tensor], torch.Tensor], classifier.logits) if classifier is not None else None,
                keep_images=2 * columns, progress=bar.update, is_splits=cfg.is_splits,
            )  # fmt: skip
        run_name = checkpoint.parent.parent.name
        grid_name = f"{run_name}_{schedule.name}_{cfg.decode.cache}_w{settings.guidance_scale:g}{policy_slug(policy)}_seed{seed}"
        grid_stem = results.parent / "grids" / grid_name
        # Class-conditional samples hold labels 0, 1, ..., C-1, 0, ...: with C <= 10 columns, one row per round of classes.
        media_files = save_media(quality.first_images, grid_stem, nrow=columns)
        grid_path = next(path for path in media_files if path.suffix == ".png")  # the image grid or the clips' frame strip
        row = {
            "experiment": cfg.name,
            "checkpoint": str(checkpoint),
            "distill": "single" if len(model.cfg.widths) == 1 else run_config.get("distill", {}).get("mode", "unknown"),
            "task": task.name,
            "schedule": schedule.name,
            "widths": "-".join(map(str, schedule.widths)),
            "steps_per_width": "-".join(map(str, schedule.steps)),
            "cache": cfg.decode.cache,
            "guidance": settings.guidance_scale,
            "policy": policy,
            "steps": len(width_per_step),
            "samples": quality.samples,
            "extractor": extractor.name,
            "reference": described,
            "seed": seed,
            "aggregate": "",
            "n_seeds": 1,
            "fid": round(quality.frechet, 4) if metric == "fid" else "",
            "fvd": round(quality.frechet, 4) if metric == "fvd" else "",
            "rfid": rounded_or_empty(rfid, 4),
            "inception_score": rounded_or_empty(quality.inception_score, 4),
            "inception_score_std": rounded_or_empty(quality.inception_score_std, 4),
            "class_acc": rounded_or_empty(quality.class_acc, 4),
            "gflops_per_sample": round(quality.gflops_per_sample, 6),
            "seconds": round(quality.seconds, 1),
            "git_commit": commit,
            "grid": str(grid_path.relative_to(results.parent)),
            "checkpoint_sha256": identity(checkpoint),
            "tokenizer_sha256": tokenizer_id,
            "tokenizer_check": tokenizer_check,
            "extractor_sha256": short(extractor.weights_id),
            "classifier_sha256": identity(classifier_path) if classifier is not None else "",
        }
        real = "an unknown number of" if reference.meta.get("count") == "unknown" else str(reference.count)
        score = "" if math.isnan(quality.inception_score) else f"IS {quality.inception_score:.2f}, "
        floor = "" if math.isnan(rfid) else f" (r{frechet_label(extractor)} {rfid:.2f})"
        print(
            f"{description} seed {seed}: {frechet_label(extractor)} {quality.frechet:.2f}{floor} ({extractor.name}, "
            f"{quality.samples} samples vs {real} real, {described}), {score}class accuracy {quality.class_acc:.3f}, "
            f"{quality.gflops_per_sample:.3f} GFLOPs/sample"
        )
        return row, chunks

    measured = [measure_seed(seed) for seed in seeds]
    rows = [row for row, _ in measured]
    if len(rows) > 1:
        rows += aggregate_rows(rows)
        mean, std = rows[-2], rows[-1]
        print(
            f"{description}, {len(seeds)} seeds {seeds}: {frechet_label(extractor)} {mean[metric]:.2f} ± {std[metric]:.2f}, "
            f"{mean['gflops_per_sample']:.3f} ± {std['gflops_per_sample']:.3f} GFLOPs/sample (mean ± std)"
        )
    # Everything a row refers to is written before the row: a failed export leaves results.csv as it was, so the
    # natural rerun (which reuses the cached samples) appends the row once.
    if cfg.export_npz is not None:
        for (_, chunks), seed in zip(measured, seeds, strict=True):
            path = Path(cfg.export_npz)
            path = path if len(seeds) == 1 else path.with_name(f"{path.stem}_seed{seed}{path.suffix}")
            log.info("samples of seed %d in ADM's format: %s", seed, export_adm_npz(chunks, path))
    append_results(results, rows)
    print(f"{len(rows)} row(s) appended to {results}")
    if not cfg.keep_samples:  # only once the row is safe: a failure before it reruns from the cached chunks
        for _, chunks in measured:
            chunks.remove()
    return rows[0] if len(seeds) == 1 else rows[-2]


def rounded_or_empty(value: float, digits: int) -> float | str:
    """``value`` rounded, or an empty cell for NaN (a metric the row does not have)."""
    return "" if math.isnan(value) else round(value, digits)


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> tuple[float, float]:
    """The objectives of the run, for a Hydra sweeper: Fréchet distance and GFLOPs per sample (the means over seeds)."""
    return run_entry(lambda c: objectives(evaluate(c)), cfg, check_config)


if __name__ == "__main__":
    main()
