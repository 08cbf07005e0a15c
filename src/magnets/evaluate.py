"""Evaluate one decode configuration of a checkpoint: FID or FVD, Inception Score, class accuracy, GFLOPs; one row appended
to a results CSV.

    python -m magnets.evaluate [name=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
        [decode.guidance_scale=...] [samples=2000] [extractor=inception_offline | domain | i3d_torchscript extractor.path=FILE]
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
extractor or reference, reuses them too. The row goes to ``results`` (default
``<paths.runs>/<name>/results.csv``); appends hold a file lock, so parallel
multirun jobs can share the file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from magnets.cli import check_evaluate_config, run_entry
from magnets.data.shards import TokenDataset
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
    split_reference,
)
from magnets.files import file_sha256
from magnets.lit.maskgit import load_maskgit
from magnets.lit.tokenizer import load_tokenizer
from magnets.media import save_media
from magnets.metrics.extractors import (
    CLASSIFIER_EXTRACTORS,
    build_extractor,
    check_extractor_fits,
    domain_classifier_features,
    frechet_label,
    frechet_metric_name,
)
from magnets.metrics.fid import FeatureExtractor, FeatureStats
from magnets.runs import resolve_checkpoint, shard_dir, tokenizer_of_run
from magnets.sampling import DECODE_DTYPES, SamplingSettings, load_schedule
from magnets.task import Task

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "experiment", "checkpoint", "distill", "task", "schedule", "widths", "steps_per_width", "cache", "guidance", "steps",
    "samples", "extractor", "reference", "fid", "fvd", "inception_score", "inception_score_std", "class_acc",
    "gflops_per_sample", "seconds", "git_commit", "grid",
)  # fmt: skip


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path`` (header first if new) under an exclusive lock, in one write."""
    path = Path(path)
    if set(row) != set(RESULT_COLUMNS):
        raise ValueError(f"a result row needs exactly the columns {list(RESULT_COLUMNS)}; got {sorted(row)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = io.StringIO()
    csv.DictWriter(line, fieldnames=RESULT_COLUMNS, lineterminator="\n").writerow(row)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        header = ""
        if not path.exists() or path.stat().st_size == 0:
            header = ",".join(RESULT_COLUMNS) + "\n"
        else:
            with open(path, newline="") as existing:
                found = next(csv.reader(existing), [])
            if tuple(found) != RESULT_COLUMNS:
                raise ValueError(f"{path} has columns {found}, not {list(RESULT_COLUMNS)}: write to another results file")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (header + line.getvalue()).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


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
    """The extractor ``name`` with its file ``path``: ``domain`` (and the project's classifiers without a path) is the run's
    classifier; ``i3d_torchscript`` needs ``path``; the Inceptions take an optional weights file."""
    if name == "domain":
        extractor = domain_classifier_features(classifier)
    elif name in CLASSIFIER_EXTRACTORS:
        extractor = build_extractor(name, path=path or classifier)
    elif name == "i3d_torchscript":
        extractor = build_extractor(name, path=path)
    else:
        extractor = build_extractor(name, **({} if path is None else {"weights_path": path}))
    return extractor.to(device).eval()


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
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,  # each batch draws its own random numbers: another size, other samples
        "device": device.type,  # CPU and GPU draw other random numbers from one seed
        "dtype": cfg.dtype,
    }


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``cfg.samples`` samples (chunked, resumable) with the configured schedule and cache; append and return the
    result row."""
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, task, run_config = load_maskgit(checkpoint, device)
    model = model.to(DECODE_DTYPES[cfg.dtype])
    schedule = load_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
    width_per_step = schedule.width_per_step(model.cfg.widths)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = Path(cfg.tokenizer_checkpoint or tokenizer_of_run(run_config, checkpoint, cfg.paths.runs))
    tokenizer = load_tokenizer(tokenizer_path, device)
    classifier_path = run_classifier(run_config, cfg)
    # Class accuracy needs the run's classifier; a run without one (ImageNet) is measured with another extractor only.
    has_classifier = classifier_path.is_file() or cfg.extractor.name == "domain"
    classifier = domain_classifier_features(classifier_path).to(device).eval() if has_classifier else None
    extractor = build_feature_extractor(cfg.extractor.name, cfg.extractor.path, classifier_path, device)
    if classifier is not None:
        check_extractor_fits(extractor, classifier)
    reference = real_reference(run_config, cfg, extractor)
    shard = condition_shard(task, run_config, cfg)
    num_classes = model.cfg.num_classes

    key = sample_settings(checkpoint, tokenizer_path, task, schedule.name, width_per_step, cfg, device)
    chunks = SampleChunks.keyed(cfg.samples_dir, key, cfg.samples, cfg.chunk_size)
    finished = sum(chunks.is_finished(chunk) for chunk in range(len(chunks)))
    log.info("samples in %s: %d of %d chunks of %d already written", chunks.folder, finished, len(chunks), cfg.chunk_size)

    def generate(chunk: int) -> Iterator[GeneratedBatch]:
        indices = chunks.indices(chunk)
        conditions = decode_conditions(task, len(indices), num_classes, device, shard, start=indices.start)
        return generate_samples(
            model, tokenizer, task, conditions, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every,
            cfg.batch_size, chunk_generator(cfg.seed, chunk, device), compile=cfg.decode.compile,
        )  # fmt: skip

    description = f"{schedule.name}/{cfg.decode.cache}/w={settings.guidance_scale:g}"
    columns = grid_columns(task, num_classes)
    unit = "clip" if extractor.media_kind == "video" else "img"
    with tqdm(total=cfg.samples, desc=description, unit=unit, dynamic_ncols=True) as bar:
        quality = measure_samples(
            chunked_samples(chunks, generate, cfg.batch_size), model, extractor, reference,
            classifier.logits if classifier is not None else None,
            keep_images=2 * columns, progress=bar.update, is_splits=cfg.is_splits,
        )  # fmt: skip

    results = Path(cfg.results)
    grid_stem = (
        results.parent
        / "grids"
        / f"{checkpoint.parent.parent.name}_{schedule.name}_{cfg.decode.cache}_w{settings.guidance_scale:g}"
    )
    # Class-conditional samples hold labels 0, 1, ..., C-1, 0, ...: with C <= 10 columns, one row per round of classes.
    media_files = save_media(quality.first_images, grid_stem, nrow=columns)
    grid_path = next(path for path in media_files if path.suffix == ".png")  # the image grid or the clips' frame strip
    metric = frechet_metric_name(extractor)
    row = {
        "experiment": cfg.name,
        "checkpoint": str(checkpoint),
        "distill": "single" if list(model.cfg.widths) == [1] else run_config.get("distill", {}).get("mode", "unknown"),
        "task": task.name,
        "schedule": schedule.name,
        "widths": "-".join(map(str, schedule.widths)),
        "steps_per_width": "-".join(map(str, schedule.steps)),
        "cache": cfg.decode.cache,
        "guidance": settings.guidance_scale,
        "steps": len(width_per_step),
        "samples": quality.samples,
        "extractor": extractor.name,
        "reference": reference_description(reference, cfg),
        "fid": round(quality.frechet, 4) if metric == "fid" else "",
        "fvd": round(quality.frechet, 4) if metric == "fvd" else "",
        "inception_score": rounded_or_empty(quality.inception_score, 4),
        "inception_score_std": rounded_or_empty(quality.inception_score_std, 4),
        "class_acc": rounded_or_empty(quality.class_acc, 4),
        "gflops_per_sample": round(quality.gflops_per_sample, 6),
        "seconds": round(quality.seconds, 1),
        "git_commit": git_commit(),
        "grid": str(grid_path.relative_to(results.parent)),
    }
    append_result(results, row)
    if cfg.export_npz is not None:
        log.info("samples in ADM's format: %s", export_adm_npz(chunks, cfg.export_npz))
    if not cfg.keep_samples:
        chunks.remove()
    real = "an unknown number of" if reference.meta.get("count") == "unknown" else str(reference.count)
    score = "" if math.isnan(quality.inception_score) else f"IS {quality.inception_score:.2f}, "
    print(
        f"{description}: {frechet_label(extractor)} {quality.frechet:.2f} ({extractor.name}, {quality.samples} samples vs "
        f"{real} real, {row['reference']}), {score}class accuracy {quality.class_acc:.3f}, "
        f"{quality.gflops_per_sample:.3f} GFLOPs/sample; appended to {results}"
    )
    return row


def rounded_or_empty(value: float, digits: int) -> float | str:
    """``value`` rounded, or an empty cell for NaN (a metric the row does not have)."""
    return "" if math.isnan(value) else round(value, digits)


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(evaluate, cfg, check_evaluate_config)


if __name__ == "__main__":
    main()
