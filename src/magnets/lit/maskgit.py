"""LightningModule that trains every nested width at once, with progressive distillation."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics import MeanMetric

from magnets.choices import DISTILL_MODES
from magnets.errors import MismatchError
from magnets.lit.checkpoints import load_model_weights, read_checkpoint
from magnets.lit.optim import warmup_cosine
from magnets.masking import random_training_mask
from magnets.models.transformer import NestedTransformer, TransformerConfig
from magnets.task import Task, task_of_hparams


class NestedMaskGITModule(L.LightningModule):
    """Masks each batch once and sums the losses of every width on it.

    m_1 learns from the ground-truth tokens. With ``distill="progressive"``
    each smaller m_p learns from ``alpha * CE(ground truth) + (1 - alpha) *
    CE(soft targets of the next larger width, detached)``, alpha decaying
    linearly from 1 to 0 over ``alpha_decay_steps``; with ``distill="none"``
    every width learns from the ground truth only. ``model["widths"] = [1]``
    is plain single-width MaskGIT. ``task`` (:class:`magnets.task.Task`
    fields) says which leading tokens are given (never masked, so never in
    the loss) and whether the model sees the class. ``compile`` runs each
    width's forward through ``torch.compile`` (static shapes, one graph per
    width): on a GPU it fuses the small widths' full-width elementwise work
    (bias + GELU, LayerNorm, residual adds) that dominates their time.
    """

    hparams: AttributeDict  # what save_hyperparameters() stores (Lightning types the property more loosely)
    forward_logits: Callable[..., torch.Tensor]  # set in __init__ with object.__setattr__: not a submodule

    def __init__(
        self,
        model: dict[str, Any],
        distill: str = "progressive",
        alpha_decay_steps: int = 1000,
        label_dropout: float = 0.1,
        label_smoothing: float = 0.0,
        mask_schedule: str = "cosine",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.96),
        weight_decay: float = 0.045,
        warmup_steps: int = 100,
        seed: int = 0,
        task: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if distill not in DISTILL_MODES:
            raise ValueError(f"unknown distill mode {distill!r}; valid: {list(DISTILL_MODES)}")
        self.save_hyperparameters()
        self.model = NestedTransformer(TransformerConfig(**model))
        self.task = Task(**(task or {}))
        self.task.check_fits(self.model.cfg.num_tokens)
        # Largest first: each width's teacher is the one computed just before it.
        self.widths = sorted(self.model.cfg.widths)
        self.val_loss = torch.nn.ModuleDict({f"p{p}": MeanMetric() for p in self.widths})
        self.val_acc = torch.nn.ModuleDict({f"p{p}": MeanMetric() for p in self.widths})
        self._step_started = 0.0
        # Not a submodule (stays out of state_dict); the compiled graphs are made at the first call of each width.
        object.__setattr__(self, "forward_logits", torch.compile(self.model, dynamic=False) if compile else self.model)

    def alpha(self, step: int | None = None) -> float:
        """Weight of the ground-truth loss for smaller widths at ``step`` (default: now): 1 -> 0 over ``alpha_decay_steps``."""
        step = self.global_step if step is None else step
        return max(0.0, 1.0 - step / max(1, self.hparams.alpha_decay_steps))

    def _mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked inputs ``[B, N]`` and the mask ``[B, N]`` (True = masked; never a given token)."""
        maskable = self.task.maskable(tokens.shape[1], tokens.device)
        # mypy: torch.Size unpacks to an unknown number of ints; tokens is [B, N].
        batch, length = tokens.shape
        mask = random_training_mask(batch, length, self.hparams.mask_schedule, generator, tokens.device, maskable)
        return tokens.masked_fill(mask, self.model.cfg.mask_id), mask

    def width_losses(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        label_smoothing: float = 0.0,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per width: (loss, accuracy) on the masked positions."""
        out = {}
        teacher_probs = None
        for p in self.widths:
            logits = self.forward_logits(inputs, labels, width=p)[mask]  # [M, V]: masked positions only
            ce = F.cross_entropy(logits, targets[mask], label_smoothing=label_smoothing)
            if teacher_probs is None or self.hparams.distill == "none":
                loss = ce
            else:
                soft_ce = -(teacher_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
                loss = alpha * ce + (1 - alpha) * soft_ce
            teacher_probs = F.softmax(logits.detach(), dim=-1)
            out[p] = (loss, (logits.argmax(-1) == targets[mask]).float().mean())
        return out

    def step_generator(self, device: torch.device) -> torch.Generator:
        """Randomness of one training step, a function of (seed, step, rank) only: resumed runs repeat it exactly."""
        seed = (self.hparams.seed * 1_000_003 + self.global_step) * 4099 + self.global_rank
        return torch.Generator(device=device).manual_seed(seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        generator = self.step_generator(tokens.device)
        inputs, mask = self._mask(tokens, generator)
        labels = self.task.model_labels(labels, self.model.cfg.null_class)
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.hparams.label_dropout
        labels = labels.masked_fill(drop, self.model.cfg.null_class)
        alpha = self.alpha()
        losses = self.width_losses(inputs, tokens, mask, labels, alpha, self.hparams.label_smoothing)
        for p, (loss, acc) in losses.items():
            self.log_dict({f"train/loss/p{p}": loss, f"train/acc/p{p}": acc})
        total = cast(torch.Tensor, sum(loss for loss, _ in losses.values()))
        self.log("train/loss", total, prog_bar=True)
        if self.hparams.distill == "progressive":
            self.log("train/alpha", alpha)
        return total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        tokens = batch[0].numel() * self.trainer.world_size
        self.log("train/tokens_per_s", tokens / max(1e-9, time.perf_counter() - self._step_started))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Held-out masked-token cross-entropy (no smoothing) with a mask fixed per batch index."""
        tokens, labels = batch
        generator = torch.Generator(device=tokens.device).manual_seed(batch_idx)
        inputs, mask = self._mask(tokens, generator)
        labels = self.task.model_labels(labels, self.model.cfg.null_class)
        for p, (loss, acc) in self.width_losses(inputs, tokens, mask, labels, alpha=1.0).items():
            weight = int(mask.sum())
            cast(MeanMetric, self.val_loss[f"p{p}"]).update(loss, weight)
            cast(MeanMetric, self.val_acc[f"p{p}"]).update(acc, weight)

    def on_validation_epoch_end(self) -> None:
        for key in self.val_loss:
            self.log(f"val/loss/{key}", cast(MeanMetric, self.val_loss[key]).compute())
            self.log(f"val/acc/{key}", cast(MeanMetric, self.val_acc[key]).compute())
            cast(MeanMetric, self.val_loss[key]).reset()
            cast(MeanMetric, self.val_acc[key]).reset()

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        # Weight decay on the matrices of linear layers only: not on norms, biases or embeddings.
        decay = [m.weight for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        decay_ids = {id(p) for p in decay}
        no_decay = [p for p in self.model.parameters() if id(p) not in decay_ids]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_maskgit(
    checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[NestedTransformer, Task, dict[str, Any], dict[str, Any]]:
    """The nested transformer of a :class:`NestedMaskGITModule` checkpoint (eval mode), its task, its saved run config and
    its provenance (the tokenizer of the tokens it trained on, the token splits' identities; empty when unrecorded)."""
    ckpt = read_checkpoint(checkpoint, "nested MaskGIT", map_location)
    try:
        model = NestedTransformer(TransformerConfig(**ckpt["hyper_parameters"]["model"]))
        task = task_of_hparams(ckpt["hyper_parameters"])
    except TypeError as err:
        saved = ckpt["hyper_parameters"]["model"]
        hint = "; it is a tokenizer checkpoint: give it as tokenizer_checkpoint=" if "in_channels" in saved else ""
        raise MismatchError(
            f"{checkpoint} is not a nested MaskGIT checkpoint: its model config does not fit ({err}){hint}"
        ) from None
    return load_model_weights(model, ckpt, checkpoint), task, ckpt.get("config", {}), ckpt.get("provenance", {})
