"""Sample quality of a decode configuration: FID (images) or FVD (clips), Inception Score, class accuracy, GFLOPs per sample.

Shared by ``python -m magnets.evaluate`` and the validation callback
(``magnets.lit.sampling_validation.SamplingValidation``): generated media go
through a feature extractor (``magnets.metrics.extractors``) and the
project's classifier. What each sample is decoded from (a class, or a real
clip's first frames) is a :class:`DecodeConditions` of the run's task.

Evaluation at the papers' scale (50,000 samples) writes the samples in
chunks (:class:`SampleChunks`): each chunk's decode is seeded from (seed,
chunk index) alone (:func:`chunk_generator`) and its file is written
atomically with deterministic bytes, so an interrupted evaluation resumes
with the chunks it finished and ends with exactly the samples, files and
metrics of an unbroken one (:func:`chunked_samples`).

:func:`evaluate_checkpoint` is the work of ``python -m magnets.evaluate``
(whose config is checked before this module, and torch, load): one decode
configuration of a checkpoint, a row per seed appended to the results file
(:mod:`magnets.results`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from magnets.cli import check_policy_fits, check_schedule, evaluation_seeds
from magnets.data.base import build_datamodule, drop_unreadable, to_unit_float
from magnets.data.shards import TokenDataset
from magnets.decoding.flops import decode_flops_per_sample
from magnets.decoding.loop import DECODE_DTYPES, SamplingSettings, decode
from magnets.decoding.plan import StepWork, plan_decode
from magnets.decoding.policies import (
    PolicyLogits,
    RouteSettings,
    build_decode_callables,
    policy_label,
    policy_slug,
    route_settings,
)
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError, MismatchError
from magnets.files import atomic_write, atomic_write_text, file_sha256
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
from magnets.metrics.fid import FeatureAccumulator, FeatureExtractor, FeatureStats, frechet_distance, resolve_reference
from magnets.metrics.reconstruction import reconstruction_fid, rfid_cache_path
from magnets.models.tokenizer import Tokenizer
from magnets.models.transformer import NestedTransformer
from magnets.provenance import check_tokenizer_identity, identity, short
from magnets.results import aggregate_rows, append_results, git_commit, rounded_or_empty
from magnets.runs import check_tokenizer_fits_model, resolve_checkpoint, shard_dir, tokenizer_of_run
from magnets.task import Task

log = logging.getLogger(__name__)


@dataclass
class GeneratedBatch:
    """Media (images ``[b, C, H, W]`` or clips ``[b, C, T, H, W]``: float in [0, 1] from the decoder, uint8 read back from
    a chunk file), the class of each ``[b]`` (asked for, or the real clip's under frame prediction), their tokens ``[b, N]``,
    the decode's work."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    work: list[StepWork]


def balanced_labels(samples: int, num_classes: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """``samples`` labels cycling through every class: ``[0, 1, ..., C-1, 0, 1, ...]`` from the ``start``-th on."""
    return torch.arange(start, start + samples, device=device) % num_classes


MAX_GRID_COLUMNS = 10


def grid_columns(task: Task, num_classes: int) -> int:
    """Items per row of a sample grid or strip: one per class (at most 10: labels cycle, so column c holds class c when
    there are no more), or 8 predicted clips under frame prediction."""
    return 8 if task.given_tokens else min(num_classes, MAX_GRID_COLUMNS)


@dataclass
class DecodeConditions:
    """What each of S samples is decoded from.

    ``labels`` ``[S]``: the class asked for (class-conditional), or the real
    item's class (frame prediction; the model sees it only if the task uses
    the class); class accuracy is measured against them. ``real_tokens``
    ``[S, N]``: the real items whose given tokens start each decode (None
    when the task gives none).
    """

    labels: torch.Tensor
    real_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def decode_conditions(
    task: Task,
    samples: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    shard: TokenDataset | None = None,
    start: int = 0,
) -> DecodeConditions:
    """Class-balanced labels, or for a task with given tokens the items of ``shard`` in order, cycled to ``samples``.

    ``start`` skips that many conditions of the sequence: samples ``[start, start + samples)`` of a longer run.
    """
    if not task.given_tokens:
        return DecodeConditions(balanced_labels(samples, num_classes, device, start))
    if shard is None or len(shard) == 0:
        raise ValueError(f"task {task.name!r} decodes from real items' given tokens: it needs a non-empty token shard")
    index = np.arange(start, start + samples) % len(shard)  # [S]: every item once before any repeats
    tokens = torch.from_numpy(np.asarray(shard.tokens[index], dtype=np.int64))  # [S, N]
    labels = torch.from_numpy(np.asarray(shard.labels[index], dtype=np.int64))  # [S]
    return DecodeConditions(labels.to(device), tokens.to(device))


@torch.inference_mode()
def generate_samples(
    model: NestedTransformer,
    tokenizer: Tokenizer,
    task: Task,
    conditions: DecodeConditions,
    width_per_step: Sequence[int],
    settings: SamplingSettings,
    cache: str,
    refresh_every: int = 2,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    compile: bool = False,
    autocast_dtype: torch.dtype | None = None,
    fast: bool = False,
    refresh_layer: int = 0,
    route: RouteSettings | None = None,
) -> Iterator[GeneratedBatch]:
    """Decode one sample per condition, ``batch_size`` at a time, and turn the tokens into media.

    Each decode starts from [MASK] everywhere but the task's given tokens
    (taken from ``conditions.real_tokens``), which every output keeps.
    ``compile``: the transformer's forward through ``torch.compile``;
    ``fast``: the planned path (``magnets.decoding.cache.PlannedLogits``,
    reused across calls while the model's weights stay where they are);
    ``autocast_dtype`` (e.g. bfloat16 under bf16-mixed training): the
    transformer runs under autocast, the tokenizer's decode does not.
    ``refresh_layer`` and ``route``: the decode policies of ``magnets.decoding.policies``.
    """
    cfg = model.cfg
    grid = tuple(tokenizer.grid)
    if list(grid) != list(cfg.grid):
        raise MismatchError(f"the tokenizer makes a {list(grid)} token grid but the model was trained on {cfg.grid}")
    tokens_to_logits, unconditional_logits = build_decode_callables(
        model, settings, cache, refresh_every, refresh_layer=refresh_layer, route=route, compile=compile, fast=fast,
        width_per_step=width_per_step,
    )  # fmt: skip
    revealable = tokens_to_logits.revealable if isinstance(tokens_to_logits, PolicyLogits) else None
    device = conditions.labels.device
    for start in range(0, len(conditions), batch_size):
        labels = conditions.labels[start : start + batch_size]
        real = None if conditions.real_tokens is None else conditions.real_tokens[start : start + batch_size]
        initial = task.decode_start(real, len(labels), cfg.num_tokens, cfg.mask_id).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            result = decode(
                tokens_to_logits, initial, task.model_labels(labels, cfg.null_class), width_per_step, settings,
                mask_id=cfg.mask_id, null_class=cfg.null_class, generator=generator,
                unconditional_logits=unconditional_logits, revealable=revealable,
            )  # fmt: skip
        media = tokenizer.decode(result.tokens.view(-1, *grid))  # [b, N] -> [b, *grid] -> [b, C, *spatial]
        yield GeneratedBatch(media, labels, result.tokens, result.work)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score of logits ``[N, C]``: its mean and standard deviation over ``splits`` splits, in float64.

    torchmetrics' ``InceptionScore.compute``: per split, ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y|x)`` the softmax
    of a row and ``p(y)`` the split's mean of them; the splits are ``torch.chunk``'s (``ceil(N / splits)`` rows each,
    so fewer splits when ``N`` is not a multiple); the std is unbiased (NaN for one split). Unlike torchmetrics the
    rows are not shuffled first: the splits are contiguous in sample order (class-balanced samples cycle through the
    classes, so every split holds them all), which makes the score a function of the samples alone.
    """
    if logits.ndim != 2 or len(logits) == 0 or splits < 1:
        raise ValueError(f"expected logits [N, C] with N >= 1 and splits >= 1, got shape {list(logits.shape)}, splits {splits}")
    log_prob = logits.detach().to("cpu", torch.float64).log_softmax(dim=1)  # [N, C]
    scores = []
    for part in log_prob.chunk(splits):
        prob = part.exp()
        log_marginal = prob.mean(dim=0, keepdim=True).log()  # [1, C]: log p(y) of the split
        kl = (prob * (part - log_marginal)).sum(dim=1)  # [n]: KL(p(y|x) || p(y)) per row
        scores.append(kl.mean().exp())
    score = torch.stack(scores)
    return float(score.mean()), float(score.std()) if len(score) > 1 else float("nan")


@functools.cache
def report_no_logits(extractor: str, reason: str) -> None:
    """Say once per process and extractor why its Inception Score is NaN."""
    log.warning("Inception Score is NaN with the %r extractor: %s", extractor, reason)


@dataclass
class SampleQuality:
    """What one decode configuration achieved."""

    frechet: float  # Fréchet distance of the extractor's features: FID for images, FVD for clips
    inception_score: float  # of the extractor's logits; NaN for an extractor without them
    inception_score_std: float
    class_acc: float
    gflops_per_sample: float
    samples: int
    seconds: float
    first_images: torch.Tensor  # [<= keep_images, C, ...], for grids


@torch.inference_mode()
def measure_samples(
    batches: Iterable[GeneratedBatch],
    model: NestedTransformer,
    extractor: FeatureExtractor,
    reference: FeatureStats,
    classify: Callable[[torch.Tensor], torch.Tensor] | None,
    keep_images: int = 0,
    progress: Callable[[int], None] | None = None,
    is_splits: int = 10,
) -> SampleQuality:
    """Fréchet distance to ``reference`` (FID / FVD), Inception Score of the extractor's logits over ``is_splits`` splits
    (:func:`inception_score`; NaN, said once, for an extractor without logits), accuracy of ``classify`` (logits) on the
    batches' labels, GFLOPs/sample. uint8 media (chunk files) are read as ``x / 255``."""
    start = time.perf_counter()
    features = FeatureAccumulator()
    work: list[StepWork] = []
    logits: list[torch.Tensor] | None = []
    kept: list[torch.Tensor]
    correct, samples, kept = 0, 0, []
    for batch in batches:
        images, labels = batch.images, batch.labels
        if images.dtype == torch.uint8:
            images = to_unit_float(images)
        batch_features, batch_logits = extractor.features_and_logits(images.to(extractor.device))
        features.update(batch_features)
        if batch_logits is None:
            logits = None
        elif logits is not None:
            logits.append(batch_logits.cpu())
        if classify is not None:
            correct += int((classify(images).argmax(dim=1).to(labels.device) == labels).sum())
        samples += len(images)
        work.extend(batch.work)
        if sum(len(k) for k in kept) < keep_images:
            kept.append(images[: keep_images - sum(len(k) for k in kept)].cpu())
        if progress is not None:
            progress(len(images))
    generated = features.stats()
    if logits is None:
        report_no_logits(extractor.name, extractor.logits_missing)
        score = (float("nan"), float("nan"))
    else:
        score = inception_score(torch.cat(logits), is_splits)
    return SampleQuality(
        frechet=frechet_distance(generated.mean, generated.cov, reference.mean, reference.cov),
        inception_score=score[0],
        inception_score_std=score[1],
        class_acc=correct / samples if classify is not None else float("nan"),
        gflops_per_sample=decode_flops_per_sample(model.cfg, work, samples) / 1e9,
        samples=samples,
        seconds=time.perf_counter() - start,
        first_images=torch.cat(kept) if kept else torch.empty(0),
    )


def to_uint8(media: torch.Tensor) -> torch.Tensor:
    """Media float in ``[0, 1]`` -> uint8 ``round(255 x)``: the 256 levels of a saved image, as the Inceptions quantise."""
    return media.clamp(0, 1).mul(255).round().to(torch.uint8)


def chunk_generator(seed: int, chunk: int, device: torch.device | str) -> torch.Generator:
    """The random stream of one chunk's decode, a function of (seed, chunk index) only: a resumed run repeats it."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + chunk)


ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # every member's timestamp, so that equal arrays give equal files


@dataclass(frozen=True)
class StreamedArray:
    """An array written part by part: ``parts`` concatenated along the first axis make ``shape``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: Iterable[np.ndarray]


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray | StreamedArray]) -> None:
    """``np.savez``'s format (uncompressed; ``np.load`` reads it) with fixed timestamps: the bytes depend on the arrays only.

    A :class:`StreamedArray` is written without holding it whole (an export of 50,000 samples).
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            if isinstance(array, np.ndarray):
                array = StreamedArray(array.shape, array.dtype, [array])
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(array.dtype)), "fortran_order": False, "shape": array.shape}
            rows = 0
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE), "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for part in array.parts:
                    part = np.ascontiguousarray(part, dtype=array.dtype)
                    if part.shape[1:] != array.shape[1:]:
                        raise ValueError(f"{name}: a part of shape {list(part.shape)} in an array of shape {list(array.shape)}")
                    member.write(part.data)
                    rows += len(part)
            if rows != (array.shape[0] if array.shape else 1):
                raise ValueError(f"{name}: parts of {rows} rows in all for an array of shape {list(array.shape)}")


WORK_FIELDS = tuple(field.name for field in dataclasses.fields(StepWork))
CHUNK_FORMAT = 1  # part of every chunk folder's key: bump it when what a chunk file holds changes
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class SampleChunks:
    """``samples`` generated samples stored ``chunk_size`` per file: ``folder/chunk-00000.npz``, ``chunk-00001.npz``, ...

    Chunk ``i`` holds samples ``[i * chunk_size, (i + 1) * chunk_size)`` (the last one fewer), so a run of more
    samples in the same folder reuses the chunks of a run of fewer. Each file holds ``media`` uint8 ``[n, C, H, W]``
    (clips ``[n, C, T, H, W]``), ``labels`` ``[n]``, ``tokens`` ``[n, N]`` and the decode's work, one entry per
    :class:`StepWork` (``work_width``, ``work_kind``, ...), from which GFLOPs per sample are recomputed.
    """

    folder: Path
    samples: int
    chunk_size: int

    @classmethod
    def keyed(cls, root: str | Path, settings: Mapping[str, Any], samples: int, chunk_size: int) -> SampleChunks:
        """The chunks in ``root/<key>``, ``key`` the sha256 (16 hex digits) of ``settings`` plus the chunk size and
        format: ``settings`` must hold everything that determines the samples (weights, decode, seed, ...), not their
        count. ``settings.json`` in the folder records them."""
        described = {**settings, "chunk_size": chunk_size, "chunk_format": CHUNK_FORMAT}
        text = json.dumps(described, sort_keys=True, indent=2) + "\n"
        folder = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
        if not (folder / SETTINGS_FILE).is_file():
            atomic_write_text(folder / SETTINGS_FILE, text)
        return cls(folder, samples, chunk_size)

    def __len__(self) -> int:
        return -(-self.samples // self.chunk_size)

    def indices(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.samples))

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:05d}.npz"

    def write(self, chunk: int, batches: Iterable[GeneratedBatch]) -> GeneratedBatch:
        """Save one chunk's batches atomically, media quantised by :func:`to_uint8`; returns them as one uint8 batch.

        Each batch is moved to the CPU as uint8 as it comes, so a chunk never stands in device memory as float.
        """
        media, labels, tokens, work = [], [], [], []
        for b in batches:
            media.append(to_uint8(b.images).cpu())
            labels.append(b.labels.cpu())
            tokens.append(b.tokens.cpu())
            work.extend(b.work)
        batch = GeneratedBatch(torch.cat(media), torch.cat(labels), torch.cat(tokens), work)
        if len(batch.labels) != len(self.indices(chunk)):
            raise ValueError(f"chunk {chunk} holds samples {self.indices(chunk)}, got {len(batch.labels)}")
        arrays = {
            "media": batch.images.numpy(),
            "labels": batch.labels.numpy().astype(np.int64),
            "tokens": batch.tokens.numpy().astype(np.int64),
            **{f"work_{name}": np.array([getattr(w, name) for w in batch.work]) for name in WORK_FIELDS},
        }
        atomic_write(self.path(chunk), lambda tmp: write_npz(tmp, arrays))
        return batch

    def _load(self, chunk: int, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
        path = self.path(chunk)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in keys}
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise MismatchError(f"{path}: not a readable sample chunk ({type(err).__name__}: {err}); delete it") from err

    def is_finished(self, chunk: int) -> bool:
        """Whether the chunk's file holds its samples (reading its labels only)."""
        arrays = self._load(chunk, ["labels"])
        return arrays is not None and len(arrays["labels"]) == len(self.indices(chunk))

    def read(self, chunk: int) -> GeneratedBatch | None:
        """The chunk's samples (media uint8) from its file; None when there is no file or it holds another count of
        samples (the last chunk of an evaluation of fewer samples: it is regenerated)."""
        arrays = self._load(chunk, ["media", "labels", "tokens", *(f"work_{name}" for name in WORK_FIELDS)])
        if arrays is None or len(arrays["labels"]) != len(self.indices(chunk)):
            return None
        work = [
            StepWork(**{name: arrays[f"work_{name}"][i].item() for name in WORK_FIELDS}) for i in range(len(arrays["work_width"]))
        ]
        media, labels, tokens = (torch.from_numpy(arrays[key]) for key in ("media", "labels", "tokens"))
        return GeneratedBatch(media, labels, tokens, work)

    def remove(self) -> None:
        """Delete the chunk files and ``settings.json``, and the folder when nothing else is left in it."""
        for chunk in range(len(self)):
            self.path(chunk).unlink(missing_ok=True)
        (self.folder / SETTINGS_FILE).unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def split_batch(batch: GeneratedBatch, batch_size: int) -> Iterator[GeneratedBatch]:
    """``batch`` in pieces of ``batch_size`` items; the decode's work goes with the first (GFLOPs sum it)."""
    for start in range(0, len(batch.labels), batch_size):
        end = start + batch_size
        work = batch.work if start == 0 else []
        yield GeneratedBatch(batch.images[start:end], batch.labels[start:end], batch.tokens[start:end], work)


def chunked_samples(
    chunks: SampleChunks, generate: Callable[[int], Iterable[GeneratedBatch]], batch_size: int
) -> Iterator[GeneratedBatch]:
    """Every chunk's samples in order, ``batch_size`` per batch, media uint8: a chunk is read from its file when that
    holds its samples, else ``generate(chunk)`` decodes it and it is written (:meth:`SampleChunks.write`) before its
    batches are yielded. A written chunk and a read one are the same uint8 samples, so metrics over a resumed run
    equal an unbroken run's."""
    for chunk in range(len(chunks)):
        batch = chunks.read(chunk)
        if batch is None:
            batch = chunks.write(chunk, generate(chunk))
        else:
            log.info("chunk %d (samples %d-%d): read from %s", chunk, chunks.indices(chunk).start,
                     chunks.indices(chunk).stop - 1, chunks.path(chunk))  # fmt: skip
        yield from split_batch(batch, batch_size)


def export_adm_npz(chunks: SampleChunks, path: str | Path) -> Path:
    """Write the chunks' samples as ADM's evaluator reads them: ``arr_0`` uint8 ``[N, H, W, 3]`` (clips
    ``[N, T, H, W, 3]``; grayscale replicated to RGB) and ``arr_1`` the labels ``[N]``, atomically, chunk by chunk."""
    first = chunks.read(0)
    if first is None:
        raise FileNotFoundError(f"{chunks.path(0)}: no chunk of samples to export")
    item = tuple(first.images.shape[1:])  # (C, H, W) or (C, T, H, W)
    labels: list[np.ndarray] = []  # filled while arr_0 is written, then written as arr_1

    def media() -> Iterator[np.ndarray]:
        for chunk in range(len(chunks)):
            batch = chunks.read(chunk)
            if batch is None:
                raise FileNotFoundError(f"{chunks.path(chunk)}: chunk {chunk} of {chunks.samples} samples is not written")
            labels.append(batch.labels.numpy())
            images = batch.images.expand(-1, 3, *item[1:])  # [n, 1 or 3, ...] -> [n, 3, ...]
            yield images.movedim(1, -1).numpy()  # [n, 3, ...] -> [n, ..., 3]

    arrays = {
        "arr_0": StreamedArray((chunks.samples, *item[1:], 3), np.dtype(np.uint8), media()),
        "arr_1": StreamedArray((chunks.samples,), np.dtype(np.int64), labels),
    }
    return atomic_write(path, lambda tmp: write_npz(tmp, arrays))


def media_key(data_cfg: Mapping[str, Any]) -> str:
    """Dataset part of a reference-statistics cache key: name, frames (clips) and resolution, e.g. ``moving_fmnist_17x32``."""
    frames = f"_{data_cfg['frames']}x" if data_cfg.get("kind") == "video" else ""
    return f"{data_cfg['name']}{frames}{data_cfg['image_size']}"


def split_reference(
    data_cfg: Mapping[str, Any],
    split: str,
    count: int,
    npz: str | Path | None,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    batch_size: int,
) -> FeatureStats:
    """The real side of FID/FVD: the statistics file ``npz`` when given, else those of the first ``count`` items of
    ``split`` of the ``data`` config's dataset (all of it when it has fewer), cached in ``cache_dir`` under ``<split>-<count>``.

    Unreadable items (``magnets.data.base.UNREADABLE_LABEL``) are left out.
    """
    items = reference_items(data_cfg, split, count, batch_size)
    return resolve_reference(npz, items, media_key(data_cfg), f"{split}-{count}", extractor, cache_dir)


def reference_items(data_cfg: Mapping[str, Any], split: str, count: int, batch_size: int) -> Callable[[], DataLoader]:
    """The first ``count`` items of ``split`` (all of it when it has fewer) as batches ``(uint8 media, labels)``, unreadable
    items left out: called only when needed, so a statistics file or cached value needs no dataset."""

    def items() -> DataLoader:
        dataset = build_datamodule(data_cfg).dataset(split)
        subset = Subset(dataset, range(min(count, len(cast(Sized, dataset)))))
        return DataLoader(subset, batch_size=batch_size, collate_fn=drop_unreadable)

    return items


# ---------------------------------------------------------------------------------------------------------------------
# The work of ``python -m magnets.evaluate`` (its config is checked there, before this module loads)


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


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------------------------------
# The work of ``python -m magnets.sample`` (its config is checked there, before this module loads)


def sample_grid(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``samples_per_class`` samples of every class; write the grid and tokens; return a summary."""
    device = torch.device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.paths.runs, cfg.name)
    model, task, run_config, provenance = load_maskgit(checkpoint, device)
    model = model.to(DECODE_DTYPES[cfg.dtype])
    model_cfg = model.cfg
    schedule = load_schedule(cast(dict[str, Any], OmegaConf.to_container(cfg.schedule, resolve=True)))
    check_schedule(cfg.schedule, model_cfg.widths)  # the checkpoint's widths: a single-width one takes no nested schedule
    width_per_step = schedule.width_per_step(model_cfg.widths)
    check_policy_fits(cfg.decode, model_cfg.widths, model_cfg.depth)
    settings = SamplingSettings.from_config(cfg.decode)
    tokenizer_path = cfg.tokenizer_checkpoint or tokenizer_of_run(run_config, checkpoint, cfg.paths.runs)
    tokenizer = cast(Tokenizer, load_tokenizer(tokenizer_path, device))
    check_tokenizer_fits_model(tokenizer.codebook_size, tokenizer.grid, Path(tokenizer_path), model_cfg, checkpoint)
    recorded = provenance.get("tokenizer_sha256")
    check_tokenizer_identity(recorded, Path(tokenizer_path), checkpoint, cfg.allow_tokenizer_mismatch)

    classes = list(range(model_cfg.num_classes)) if cfg.classes is None else list(cfg.classes)
    bad = [c for c in classes if not 0 <= c < model_cfg.num_classes]
    if bad:
        raise ConfigError("classes", bad, f"null (every class) or ids in 0..{model_cfg.num_classes - 1}")
    if task.given_tokens:  # frame prediction: the first clips of the condition split, in order
        shard = TokenDataset(shard_dir(run_config["tokenize"]["out_dir"], cfg.condition_split))
        conditions = decode_conditions(task, cfg.samples_per_class * len(classes), model_cfg.num_classes, device, shard)
    else:  # class-major: row c of the grid holds class c
        labels = torch.tensor(classes, device=device).repeat_interleave(cfg.samples_per_class)  # [C * S]
        conditions = DecodeConditions(labels)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = generate_samples(
        model, tokenizer, task, conditions, width_per_step, settings, cfg.decode.cache, cfg.decode.refresh_every,
        cfg.batch_size, generator, compile=cfg.decode.compile, fast=cfg.decode.fast,
        refresh_layer=cfg.decode.refresh_layer, route=route_settings(cfg.decode),
    )  # fmt: skip
    image_batches: list[torch.Tensor] = []
    token_batches: list[torch.Tensor] = []
    work: list[StepWork] = []
    with torch.inference_mode(), tqdm(total=len(conditions), desc=f"{schedule.name}/{cfg.decode.cache}", unit="sample") as bar:
        for batch in batches:
            image_batches.append(batch.images)
            token_batches.append(batch.tokens)
            work.extend(batch.work)
            bar.update(len(batch.labels))
    images, tokens = torch.cat(image_batches), torch.cat(token_batches)  # [S, channels, ...], [S, N]
    labels = conditions.labels

    gflops = decode_flops_per_sample(model_cfg, work, len(labels)) / 1e9
    masked = model_cfg.num_tokens - task.given_tokens
    baseline_work = plan_decode(
        model_cfg.num_tokens, [1] * len(width_per_step), "none", guided=settings.guided, num_masked=masked
    ).work()
    baseline_gflops = decode_flops_per_sample(model_cfg, baseline_work, samples=1) / 1e9
    policy = policy_label(cfg.decode)
    folder = f"{schedule.name}_{cfg.decode.cache}{policy_slug(policy)}"
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.parent.parent / "samples" / folder
    media_files = save_media(images, out_dir / "grid", nrow=cfg.samples_per_class)
    if task.given_tokens:  # the real clips the predictions started from, through the same tokenizer
        assert conditions.real_tokens is not None  # frame prediction's conditions carry them
        with torch.inference_mode():
            real = tokenizer.decode(conditions.real_tokens.view(-1, *model_cfg.grid))
        media_files += save_media(real, out_dir / "real", nrow=cfg.samples_per_class)
    summary = {
        "checkpoint": str(checkpoint),
        "task": task.name,
        "schedule": schedule.name,
        "widths": list(schedule.widths),
        "steps": list(schedule.steps),
        "cache": cfg.decode.cache,
        "policy": policy,
        "samples": len(labels),
        "gflops_per_sample": gflops,
        "baseline_gflops_per_sample": baseline_gflops,
        "flops_ratio_vs_baseline": baseline_gflops / gflops,
        "decode": OmegaConf.to_container(cfg.decode, resolve=True),
    }
    atomic_write(
        out_dir / "samples.npz",
        lambda tmp: np.savez(tmp, tokens=tokens.cpu().numpy(), labels=labels.cpu().numpy(), summary=json.dumps(summary)),
    )
    print(
        f"{schedule.name} ({cfg.decode.cache}): {gflops:.3f} GFLOPs per sample, {baseline_gflops / gflops:.2f}x fewer than "
        f"the uncached full model with K={len(width_per_step)} ({baseline_gflops:.3f}); {len(labels)} samples in {out_dir}"
    )
    return {**summary, "out_dir": out_dir, "media_files": media_files, "tokens": tokens, "images": images}
