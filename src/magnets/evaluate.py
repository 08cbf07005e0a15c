"""Evaluate one decode configuration of a checkpoint: FID, class accuracy, GFLOPs; one row appended to a results CSV.

    python -m magnets.evaluate [name=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
        [decode.guidance_scale=...] [samples=2000] [extractor=inception_offline]
    make sweep EXP=fmnist SWEEP=schedules|cache|guidance        (Hydra multirun over conf/sweep/<SWEEP>.yaml)

The real side of FID is ``reference.count`` images of ``reference.split``,
its statistics cached in ``<paths.runs>/fid_stats`` per dataset, split,
count and extractor. Class accuracy is the project's Fashion-MNIST
classifier's accuracy on the generated samples against the labels they were
asked for (``make classifier`` trains it). The row goes to ``results``
(default ``<paths.runs>/<name>/results.csv``); appends hold a file lock, so
parallel multirun jobs can share the file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from magnets.cli import check_evaluate_config, run_entry
from magnets.data.base import build_datamodule
from magnets.evaluation import balanced_labels, generate_images, measure_samples
from magnets.lit.maskgit import load_maskgit
from magnets.lit.tokenizer import load_tokenizer
from magnets.media import save_media
from magnets.metrics.fid import ClassifierFeatures, FeatureExtractor, FeatureStats, build_extractor, reference_stats
from magnets.runs import resolve_checkpoint, tokenizer_of_run
from magnets.sampling import SamplingSettings, load_schedule

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "experiment", "checkpoint", "distill", "schedule", "widths", "steps_per_width", "cache", "guidance", "steps",
    "samples", "extractor", "fid", "class_acc", "gflops_per_sample", "seconds", "git_commit", "grid",
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


def build_feature_extractor(name: str, classifier_path: str | Path, device: torch.device) -> FeatureExtractor:
    """The FID extractor ``name``; ``fmnist_classifier`` is the classifier at ``classifier_path``."""
    kwargs = {"path": classifier_path} if name == "fmnist_classifier" else {}
    return build_extractor(name, **kwargs).to(device).eval()


def real_reference(run_config: dict[str, Any], cfg: DictConfig, extractor: FeatureExtractor) -> FeatureStats:
    """Cached feature statistics of the first ``reference.count`` images of the real ``reference.split``."""
    data_cfg = run_config["data"]
    datamodule = build_datamodule(data_cfg)
    dataset = datamodule.dataset(cfg.reference.split)
    count = min(cfg.reference.count, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    loader = DataLoader(subset, batch_size=cfg.batch_size)
    return reference_stats(
        loader, f"{data_cfg['name']}{data_cfg['image_size']}", f"{cfg.reference.split}-{count}", extractor,
        Path(cfg.paths.runs, "fid_stats"),
    )  # fmt: skip


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``cfg.samples`` class-balanced samples with the configured schedule and cache; append and return the row."""
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, run_config = load_maskgit(checkpoint, device)
    schedule = load_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
    width_per_step = schedule.width_per_step(model.cfg.widths)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = cfg.tokenizer_checkpoint or tokenizer_of_run(run_config, checkpoint, cfg.paths.runs)
    tokenizer = load_tokenizer(tokenizer_path, device)
    classifier = ClassifierFeatures(cfg.classifier).to(device).eval()
    extractor = build_feature_extractor(cfg.extractor, cfg.classifier, device)
    reference = real_reference(run_config, cfg, extractor)

    labels = balanced_labels(cfg.samples, model.cfg.num_classes, device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = generate_images(
        model, tokenizer, labels, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every, cfg.batch_size, generator
    )
    description = f"{schedule.name}/{cfg.decode.cache}/w={settings.guidance_scale:g}"
    with tqdm(total=cfg.samples, desc=description, unit="sample") as bar:
        quality = measure_samples(
            batches, model, extractor, reference, classifier.logits, keep_images=8 * model.cfg.num_classes, progress=bar.update
        )

    results = Path(cfg.results)
    grid_stem = (
        results.parent
        / "grids"
        / f"{checkpoint.parent.parent.name}_{schedule.name}_{cfg.decode.cache}_w{settings.guidance_scale:g}"
    )
    # first_images hold labels 0, 1, ..., C-1, 0, ...: C columns make one row per round of classes.
    grid_path = save_media(quality.first_images, grid_stem, nrow=model.cfg.num_classes)[0]
    row = {
        "experiment": cfg.name,
        "checkpoint": str(checkpoint),
        "distill": "single" if list(model.cfg.widths) == [1] else run_config.get("distill", {}).get("mode", "unknown"),
        "schedule": schedule.name,
        "widths": "-".join(map(str, schedule.widths)),
        "steps_per_width": "-".join(map(str, schedule.steps)),
        "cache": cfg.decode.cache,
        "guidance": settings.guidance_scale,
        "steps": len(width_per_step),
        "samples": quality.samples,
        "extractor": extractor.name,
        "fid": round(quality.fid, 4),
        "class_acc": round(quality.class_acc, 4),
        "gflops_per_sample": round(quality.gflops_per_sample, 6),
        "seconds": round(quality.seconds, 1),
        "git_commit": git_commit(),
        "grid": str(grid_path.relative_to(results.parent)),
    }
    append_result(results, row)
    print(
        f"{description}: FID {quality.fid:.2f} ({extractor.name}, {quality.samples} samples vs {reference.count} real), "
        f"class accuracy {quality.class_acc:.3f}, {quality.gflops_per_sample:.3f} GFLOPs/sample; appended to {results}"
    )
    return row


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(evaluate, cfg, check_evaluate_config)


if __name__ == "__main__":
    main()
