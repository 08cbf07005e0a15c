"""LightningModule that trains a tokenizer of any registered kind (2D VQ images, causal 3D clips)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics import MeanMetric, Metric

from magnets.data.base import to_unit_float
from magnets.errors import MismatchError
from magnets.lit.checkpoints import load_model_weights, read_checkpoint
from magnets.lit.optim import warmup_cosine
from magnets.media import log_media, save_media
from magnets.metrics.codebook import CodebookUsage
from magnets.models.tokenizer import TrainableTokenizer, build_tokenizer
from magnets.models.vq import VectorQuantizer


def psnr_per_item(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each item of a batch in ``[0, 1]``: ``[B, ...]`` -> ``[B]``."""
    mse = (recon.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class TokenizerModule(L.LightningModule):
    """Reconstruction (MSE) + quantizer loss; dead-code restarts for a VQ quantizer.

    Batches are ``(uint8 media, labels)`` from a media datamodule: images
    ``[B, C, H, W]`` or clips ``[B, C, T, H, W]``. Metrics, per split (``val``,
    ``test``): ``recon_loss``, ``psnr`` (per-item mean, measured on the centred
    ``content_size`` crop so that padding does not flatter it),
    ``codebook_usage`` (fraction of codes used on the whole split) and
    ``perplexity``.
    """

    hparams: AttributeDict  # what save_hyperparameters() stores (Lightning types the property more loosely)

    def __init__(
        self,
        model: dict[str, Any],
        kind: str = "vq2d",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 50,
        usage_decay: float = 0.95,
        dead_threshold: float = 0.1,
        restart_every: int = 20,
        content_size: int | None = None,
        grid_images: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: TrainableTokenizer = cast(TrainableTokenizer, build_tokenizer(kind, model))
        codebook_size = self.model.codebook_size
        self.metrics = torch.nn.ModuleDict(
            {
                split: torch.nn.ModuleDict(
                    {"recon_loss": MeanMetric(), "psnr": MeanMetric(), "usage": CodebookUsage(codebook_size)}
                )
                for split in ("val", "test")
            }
        )

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        size = self.hparams.content_size
        if size is None:
            return images
        margin = (images.shape[-1] - size) // 2
        return images[..., margin : margin + size, margin : margin + size]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        media = to_unit_float(batch[0])
        recon, ids, vq_loss, latents = self.model(media)
        recon_loss = F.mse_loss(recon, media)
        loss = recon_loss + vq_loss
        self.log_dict({"train/loss": loss, "train/recon_loss": recon_loss, "train/vq_loss": vq_loss}, prog_bar=True)
        counts = torch.bincount(ids.flatten(), minlength=self.model.codebook_size).float()
        # The codebook may only change after the optimizer step: on_train_batch_end gets these.
        return {"loss": loss, "latents": latents.detach(), "counts": counts}

    # mypy: outputs is training_step's dict; Lightning types the hook for any module's outputs.
    def on_train_batch_end(self, outputs: dict[str, torch.Tensor], batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        quantizer = self.model.quantizer
        if not isinstance(quantizer, VectorQuantizer):  # FSQ has no codebook to restart
            return
        counts = self.trainer.strategy.reduce(outputs["counts"], reduce_op="sum")
        quantizer.update_usage(counts, self.hparams.usage_decay)
        if (self.global_step % self.hparams.restart_every) != 0:
            return
        dead = quantizer.dead_codes(self.hparams.dead_threshold)
        if len(dead):
            latents = outputs["latents"]
            flat = latents.movedim(1, -1).reshape(-1, latents.shape[1])  # [B * prod(grid), D]
            pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
            # Every process restarts the same codes with rank 0's encoder outputs.
            # (moved through the CPU: a pickled CUDA tensor would land on rank 0's device)
            replacements = self.trainer.strategy.broadcast(flat[pick].cpu(), src=0).to(flat.device)
            quantizer.restart_codes(dead, replacements)
        self.log("train/dead_codes_restarted", float(len(dead)))

    def _eval_step(self, split: str, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        media = to_unit_float(batch[0])
        recon, ids, _, _ = self.model(media)
        recon = recon.clamp(0, 1)
        metrics = cast(Mapping[str, Metric], self.metrics[split])
        metrics["recon_loss"].update(F.mse_loss(recon, media))
        psnr = psnr_per_item(self._crop(recon), self._crop(media))
        metrics["psnr"].update(psnr, weight=torch.ones_like(psnr))
        metrics["usage"].update(ids)
        if batch_idx == 0:
            self._log_reconstructions(split, media, recon)

    def _log_epoch(self, split: str) -> None:
        metrics = cast(Mapping[str, Metric], self.metrics[split])
        usage, perplexity = metrics["usage"].compute()
        self.log_dict(
            {
                f"{split}/recon_loss": metrics["recon_loss"].compute(),
                f"{split}/psnr": metrics["psnr"].compute(),
                f"{split}/codebook_usage": usage.float(),
                f"{split}/perplexity": perplexity.float(),
            },
            prog_bar=split == "val",
            sync_dist=False,  # torchmetrics already reduced across processes
        )
        for metric in metrics.values():
            metric.reset()

    def _log_reconstructions(self, split: str, media: torch.Tensor, recon: torch.Tensor) -> None:
        """Each original beside its reconstruction: pairs of images in a grid, or alternating rows of frames."""
        if self.trainer.sanity_checking or self.logger is None:
            return
        n = min(self.hparams.grid_images, len(media))
        pairs = torch.stack([media[:n], recon[:n]], dim=1).flatten(0, 1)  # [2n, C, ...]: original, reconstruction, ...
        log_media(getattr(self.logger, "experiment", None), f"{split}/reconstructions", pairs, self.global_step, nrow=8)
        if split == "test" and self.trainer.is_global_zero:  # also as files: a PNG grid, or a GIF and a frame strip
            save_media(pairs.cpu(), Path(self.trainer.default_root_dir) / "reconstructions" / "test", nrow=8)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay
        )
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_tokenizer(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The tokenizer stored in a :class:`TokenizerModule` checkpoint, in eval mode (any registered kind)."""
    ckpt = read_checkpoint(checkpoint, "tokenizer", map_location)
    hparams = ckpt["hyper_parameters"]
    if "widths" in hparams["model"]:  # a nested transformer's hyper-parameters (no tokenizer config has widths)
        raise MismatchError(f"{checkpoint} is not a tokenizer checkpoint: it is a nested MaskGIT one (give it as checkpoint=)")
    try:
        model = build_tokenizer(hparams.get("kind", "vq2d"), hparams["model"])
    except ValueError as err:
        raise MismatchError(f"{checkpoint} is not a tokenizer checkpoint this project can build: {err}") from None
    return load_model_weights(model, ckpt, checkpoint)
