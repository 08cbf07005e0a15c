"""Validation-time sampling: every configured schedule decodes a fixed set of labels; FID, class accuracy, GFLOPs, grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from magnets.evaluation import balanced_labels, generate_images, measure_samples
from magnets.media import log_media
from magnets.metrics.fid import ClassifierFeatures, FeatureStats
from magnets.models.tokenizer import Tokenizer
from magnets.sampling import SamplingSettings, load_schedule


class SamplingValidation(L.Callback):
    """After every ``every_n``-th validation, decode ``samples`` class-balanced samples with each schedule.

    Logs ``val/fid/<schedule>`` (the classifier's features against the
    ``reference`` statistics of real images), ``val/class_acc/<schedule>``
    (the classifier's accuracy on the samples, against the labels asked for)
    and ``val/gflops/<schedule>``; sample grids per schedule
    (``val/samples/<schedule>``, one column per class) and per width
    (``val/samples_width/p<p>``: every step at that width); and, when
    training ends, the hyperparameters with the last metrics. Rank 0 samples;
    every decode uses the same labels and seed, so steps are comparable.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        classifier: ClassifierFeatures,
        reference: FeatureStats,
        schedules: Sequence[str],
        settings: SamplingSettings,
        cache: str = "refresh_on_switch",
        refresh_every: int = 2,
        samples: int = 500,
        batch_size: int = 250,
        every_n: int = 1,
        width_grids: bool = True,
        seed: int = 0,
    ) -> None:
        self.tokenizer, self.classifier, self.reference = tokenizer.eval(), classifier.eval(), reference
        self.schedules = [load_schedule(name) for name in schedules]
        self.settings, self.cache, self.refresh_every = settings, cache, refresh_every
        self.samples, self.batch_size, self.every_n = samples, batch_size, every_n
        self.width_grids, self.seed = width_grids, seed
        self.validations = 0
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n or not trainer.is_global_zero:
            return
        model, device = pl_module.model, pl_module.device
        self.tokenizer.to(device)
        self.classifier.to(device)
        labels = balanced_labels(self.samples, model.cfg.num_classes, device)
        experiment = getattr(trainer.logger, "experiment", None)
        for schedule in self.schedules:
            width_per_step = schedule.width_per_step(model.cfg.widths)
            quality = measure_samples(
                self._generate(pl_module, labels, width_per_step), model, self.classifier, self.reference,
                self.classifier.logits, keep_images=4 * model.cfg.num_classes,
            )  # fmt: skip
            metrics = {
                f"val/fid/{schedule.name}": quality.fid,
                f"val/class_acc/{schedule.name}": quality.class_acc,
                f"val/gflops/{schedule.name}": quality.gflops_per_sample,
            }
            pl_module.log_dict(metrics, rank_zero_only=True)
            self.last_metrics.update(metrics)
            self._add_grid(experiment, f"val/samples/{schedule.name}", quality.first_images, model.cfg.num_classes, trainer)
        if self.width_grids:
            steps = self.schedules[0].total_steps if self.schedules else 12
            for width in model.cfg.widths:
                width_labels = balanced_labels(2 * model.cfg.num_classes, model.cfg.num_classes, device)
                images = torch.cat([batch.images for batch in self._generate(pl_module, width_labels, [width] * steps)])
                self._add_grid(experiment, f"val/samples_width/p{width}", images, model.cfg.num_classes, trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.logger is not None and self.last_metrics and trainer.is_global_zero:
            hparams: dict[str, Any] = dict(pl_module.hparams)
            trainer.logger.log_hyperparams(hparams, {f"hp/{k.removeprefix('val/')}": v for k, v in self.last_metrics.items()})

    def _generate(self, pl_module: L.LightningModule, labels: torch.Tensor, width_per_step: Sequence[int]):
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        return generate_images(
            pl_module.model, self.tokenizer, labels, width_per_step, self.settings, self.cache, self.refresh_every,
            self.batch_size, generator,
        )  # fmt: skip

    @staticmethod
    def _add_grid(experiment: Any, tag: str, images: torch.Tensor, columns: int, trainer: L.Trainer) -> None:
        log_media(experiment, tag, images, trainer.global_step, nrow=columns)
