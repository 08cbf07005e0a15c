"""Validation-time sampling: each configured schedule decodes fixed conditions; FID/FVD, class accuracy, GFLOPs, media."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import lightning as L
import torch
from torch import nn

from magnets.data.shards import TokenDataset
from magnets.decoding.loop import SamplingSettings
from magnets.decoding.schedules import load_schedule
from magnets.evaluation import DecodeConditions, decode_conditions, generate_samples, grid_columns, measure_samples
from magnets.media import log_media
from magnets.metrics.extractors import frechet_label, frechet_metric_name
from magnets.metrics.fid import FeatureExtractor, FeatureStats
from magnets.models.tokenizer import Tokenizer
from magnets.models.transformer import NestedTransformer
from magnets.task import Task


class SamplingValidation(L.Callback):
    """After every ``every_n``-th validation, decode ``samples`` samples with each schedule and measure them.

    Logs ``val/<metric>/<schedule>``, where ``metric`` is ``fid`` for images
    and ``fvd`` for clips (the Fréchet distance of the ``extractor``'s
    features against the ``reference`` statistics of the real split: the
    project's classifier, or e.g. the Inception), ``val/inception_score/<schedule>``
    when the extractor has class logits, ``val/class_acc/<schedule>`` (the
    ``classifier``'s accuracy on the samples, against the classes asked for
    or, under frame prediction, the real clips' classes; NaN without a
    classifier) and ``val/gflops/<schedule>``; media per schedule
    (``val/samples/<schedule>``: image grids with one column per class, or
    clip frame strips) and per width (``val/samples_width/p<p>``: every step
    at that width); and, when training ends, the hyperparameters with the
    last metrics. What each sample is decoded from comes from the ``task``:
    class-balanced labels, or the items of ``condition_shard`` (frame
    prediction) cycled to ``samples``. Rank 0 samples; every decode uses the
    same conditions and seed, so steps are comparable.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        extractor: FeatureExtractor,
        reference: FeatureStats,
        schedules: Sequence[str],
        settings: SamplingSettings,
        task: Task,
        condition_shard: TokenDataset | None = None,
        classifier: FeatureExtractor | None = None,
        cache: str = "refresh_on_switch",
        refresh_every: int = 2,
        compile: bool = False,
        fast: bool = False,
        samples: int = 500,
        batch_size: int = 250,
        every_n: int = 1,
        width_grids: bool = True,
        seed: int = 0,
    ) -> None:
        self.tokenizer, self.extractor, self.reference = tokenizer.eval(), extractor.eval(), reference
        self.classifier = classifier.eval() if classifier is not None else None
        self.schedules = [load_schedule(name) for name in schedules]
        self.settings, self.cache, self.refresh_every, self.compile, self.fast = settings, cache, refresh_every, compile, fast
        self.task, self.condition_shard = task, condition_shard
        self.samples, self.batch_size, self.every_n = samples, batch_size, every_n
        self.width_grids, self.seed = width_grids, seed
        self.metric = frechet_metric_name(extractor)
        self.validations = 0
        self.last_metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text(f"val/{self.metric}/about", frechet_label(self.extractor), 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n or not trainer.is_global_zero:
            return
        model, device = cast(NestedTransformer, pl_module.model), pl_module.device
        self.tokenizer.to(device)
        self.extractor.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        classes = model.cfg.num_classes
        conditions = decode_conditions(self.task, self.samples, classes, device, self.condition_shard)
        experiment = getattr(trainer.logger, "experiment", None)
        columns = grid_columns(self.task, classes)
        for schedule in self.schedules:
            width_per_step = schedule.width_per_step(model.cfg.widths)
            # The domain classifiers have a classification head: their logits are never None.
            classify = (
                cast(Callable[[torch.Tensor], torch.Tensor], self.classifier.logits) if self.classifier is not None else None
            )
            quality = measure_samples(
                self._generate(pl_module, conditions, width_per_step), model, self.extractor, self.reference,
                classify, keep_images=2 * columns,
            )  # fmt: skip
            metrics = {
                f"val/{self.metric}/{schedule.name}": quality.frechet,
                f"val/gflops/{schedule.name}": quality.gflops_per_sample,
            }
            if self.classifier is not None:
                metrics[f"val/class_acc/{schedule.name}"] = quality.class_acc
            if not math.isnan(quality.inception_score):
                metrics[f"val/inception_score/{schedule.name}"] = quality.inception_score
            pl_module.log_dict(metrics, rank_zero_only=True)
            self.last_metrics.update(metrics)
            self._add_media(experiment, f"val/samples/{schedule.name}", quality.first_images, columns, trainer)
        if self.width_grids:
            steps = self.schedules[0].total_steps if self.schedules else 12
            few = decode_conditions(self.task, 2 * columns, classes, device, self.condition_shard)
            for width in model.cfg.widths:
                media = torch.cat([batch.images for batch in self._generate(pl_module, few, [width] * steps)])
                self._add_media(experiment, f"val/samples_width/p{width}", media, columns, trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is not None and self.last_metrics and trainer.is_global_zero:
            hparams: dict[str, Any] = dict(pl_module.hparams)
            trainer.logger.log_hyperparams(hparams, {f"hp/{k.removeprefix('val/')}": v for k, v in self.last_metrics.items()})

    def _generate(self, pl_module: L.LightningModule, conditions: DecodeConditions, width_per_step: Sequence[int]):
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        # The transformer decodes in the precision it trains in (bf16-mixed: under bf16 autocast).
        autocast_dtype = torch.bfloat16 if "bf16" in str(pl_module.trainer.precision) else None
        return generate_samples(
            cast(NestedTransformer, pl_module.model), cast(Tokenizer, self.tokenizer), self.task, conditions, width_per_step,
            self.settings, self.cache, self.refresh_every, self.batch_size, generator, compile=self.compile,
            autocast_dtype=autocast_dtype, fast=self.fast,
        )  # fmt: skip

    @staticmethod
    def _add_media(experiment: Any, tag: str, media: torch.Tensor, columns: int, trainer: L.Trainer) -> None:
        log_media(experiment, tag, media, trainer.global_step, nrow=columns)
