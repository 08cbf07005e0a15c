"""Sample quality of a decode configuration: FID (images) or FVD (clips), class accuracy of the samples, GFLOPs per sample.

Shared by ``python -m magnets.evaluate`` and the validation callback
(``magnets.lit.sampling_validation.SamplingValidation``): generated media go
through a feature extractor (``magnets.metrics.extractors``) and the
project's classifier. What each sample is decoded from (a class, or a real
clip's first frames) is a :class:`DecodeConditions` of the run's task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from magnets.data.shards import TokenDataset
from magnets.errors import MismatchError
from magnets.flops import decode_flops_per_sample
from magnets.metrics.fid import FeatureAccumulator, FeatureExtractor, FeatureStats, frechet_distance
from magnets.models.kv_cache import StepWork, build_tokens_to_logits
from magnets.models.tokenizer import Tokenizer
from magnets.models.transformer import NestedTransformer
from magnets.sampling import SamplingSettings, decode
from magnets.task import Task


@dataclass
class GeneratedBatch:
    """Media in [0, 1] (images ``[b, C, H, W]`` or clips ``[b, C, T, H, W]``), the class of each ``[b]`` (asked for, or the
    real clip's under frame prediction), their tokens ``[b, N]``, the decode's work."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    work: list[StepWork]


def balanced_labels(samples: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``samples`` labels cycling through every class: ``[0, 1, ..., C-1, 0, 1, ...]``."""
    return torch.arange(samples, device=device) % num_classes


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
    task: Task, samples: int, num_classes: int, device: torch.device | str = "cpu", shard: TokenDataset | None = None
) -> DecodeConditions:
    """Class-balanced labels, or for a task with given tokens the items of ``shard`` in order, cycled to ``samples``."""
    if not task.given_tokens:
        return DecodeConditions(balanced_labels(samples, num_classes, device))
    if shard is None or len(shard) == 0:
        raise ValueError(f"task {task.name!r} decodes from real items' given tokens: it needs a non-empty token shard")
    index = np.arange(samples) % len(shard)  # [S]: every item once before any repeats
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
) -> Iterator[GeneratedBatch]:
    """Decode one sample per condition, ``batch_size`` at a time, and turn the tokens into media.

    Each decode starts from [MASK] everywhere but the task's given tokens
    (taken from ``conditions.real_tokens``), which every output keeps.
    """
    cfg = model.cfg
    grid = tuple(tokenizer.grid)
    if list(grid) != list(cfg.grid):
        raise MismatchError(f"the tokenizer makes a {list(grid)} token grid but the model was trained on {cfg.grid}")
    tokens_to_logits = build_tokens_to_logits(model, cache, refresh_every)
    device = conditions.labels.device
    for start in range(0, len(conditions), batch_size):
        labels = conditions.labels[start : start + batch_size]
        real = None if conditions.real_tokens is None else conditions.real_tokens[start : start + batch_size]
        initial = task.decode_start(real, len(labels), cfg.num_tokens, cfg.mask_id).to(device)
        result = decode(
            tokens_to_logits, initial, task.model_labels(labels, cfg.null_class), width_per_step, settings,
            mask_id=cfg.mask_id, null_class=cfg.null_class, generator=generator,
        )  # fmt: skip
        media = tokenizer.decode(result.tokens.view(-1, *grid))  # [b, N] -> [b, *grid] -> [b, C, *spatial]
        yield GeneratedBatch(media, labels, result.tokens, result.work)


@dataclass
class SampleQuality:
    """What one decode configuration achieved."""

    frechet: float  # Fréchet distance of the extractor's features: FID for images, FVD for clips
    class_acc: float
    gflops_per_sample: float
    samples: int
    seconds: float
    first_images: torch.Tensor  # [<= keep_images, C, ...], for grids


@torch.inference_mode()
def measure_samples(
    batches: Iterator[GeneratedBatch],
    model: NestedTransformer,
    extractor: FeatureExtractor,
    reference: FeatureStats,
    classify: Callable[[torch.Tensor], torch.Tensor] | None,
    keep_images: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SampleQuality:
    """Fréchet distance to ``reference`` (FID / FVD), accuracy of ``classify`` (logits) on the batches' labels, GFLOPs/sample."""
    start = time.perf_counter()
    features = FeatureAccumulator()
    work: list[StepWork] = []
    correct, samples, kept = 0, 0, []
    for batch in batches:
        images, labels = batch.images, batch.labels
        features.update(extractor(images.to(extractor.device)))
        if classify is not None:
            correct += int((classify(images).argmax(dim=1).to(labels.device) == labels).sum())
        samples += len(images)
        work.extend(batch.work)
        if sum(len(k) for k in kept) < keep_images:
            kept.append(images[: keep_images - sum(len(k) for k in kept)].cpu())
        if progress is not None:
            progress(len(images))
    generated = features.stats()
    return SampleQuality(
        frechet=frechet_distance(generated.mean, generated.cov, reference.mean, reference.cov),
        class_acc=correct / samples if classify is not None else float("nan"),
        gflops_per_sample=decode_flops_per_sample(model.cfg, work, samples) / 1e9,
        samples=samples,
        seconds=time.perf_counter() - start,
        first_images=torch.cat(kept) if kept else torch.empty(0),
    )
