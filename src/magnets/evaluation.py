"""Sample quality of a decode configuration: FID, class accuracy of the samples, GFLOPs per sample.

Shared by ``python -m magnets.evaluate`` and the validation callback
(``magnets.lit.callbacks.SamplingValidation``): generated images go through
a feature extractor (``magnets.metrics.fid``) and the project's classifier.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from magnets.errors import MismatchError
from magnets.flops import decode_flops_per_sample
from magnets.metrics.fid import FeatureAccumulator, FeatureExtractor, FeatureStats, frechet_distance
from magnets.models.kv_cache import StepWork, build_tokens_to_logits
from magnets.models.tokenizer import Tokenizer
from magnets.models.transformer import NestedTransformer
from magnets.sampling import SamplingSettings, decode


@dataclass
class GeneratedBatch:
    """Media in [0, 1] (images ``[b, C, H, W]`` or clips ``[b, C, T, H, W]``), the labels asked for ``[b]``,
    their tokens ``[b, N]``, the decode's work."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    work: list[StepWork]


def balanced_labels(samples: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``samples`` labels cycling through every class: ``[0, 1, ..., C-1, 0, 1, ...]``."""
    return torch.arange(samples, device=device) % num_classes


def generate_images(
    model: NestedTransformer,
    tokenizer: Tokenizer,
    labels: torch.Tensor,
    width_per_step: Sequence[int],
    settings: SamplingSettings,
    cache: str,
    refresh_every: int = 2,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
) -> Iterator[GeneratedBatch]:
    """Decode one sample per label from all-[MASK], ``batch_size`` at a time, and turn the tokens into media."""
    cfg = model.cfg
    grid = tuple(tokenizer.grid)
    if list(grid) != list(cfg.grid):
        raise MismatchError(f"the tokenizer makes a {list(grid)} token grid but the model was trained on {cfg.grid}")
    tokens_to_logits = build_tokens_to_logits(model, cache, refresh_every)
    for batch_labels in labels.split(batch_size):
        initial = torch.full((len(batch_labels), cfg.num_tokens), cfg.mask_id, dtype=torch.long, device=labels.device)
        result = decode(
            tokens_to_logits, initial, batch_labels, width_per_step, settings,
            mask_id=cfg.mask_id, null_class=cfg.null_class, generator=generator,
        )  # fmt: skip
        images = tokenizer.decode(result.tokens.view(-1, *grid))  # [b, N] -> [b, *grid] -> [b, C, *spatial]
        yield GeneratedBatch(images, batch_labels, result.tokens, result.work)


@dataclass
class SampleQuality:
    """What one decode configuration achieved."""

    fid: float
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
    """FID against ``reference``, accuracy of ``classify`` (logits) on the labels asked for, and GFLOPs per sample."""
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
        fid=frechet_distance(generated.mean, generated.cov, reference.mean, reference.cov),
        class_acc=correct / samples if classify is not None else float("nan"),
        gflops_per_sample=decode_flops_per_sample(model.cfg, work, samples) / 1e9,
        samples=samples,
        seconds=time.perf_counter() - start,
        first_images=torch.cat(kept) if kept else torch.empty(0),
    )
