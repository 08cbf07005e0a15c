"""LightningModule that trains the VQ image tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio

from magnets.lit.checkpoints import load_model_weights, read_checkpoint
from magnets.lit.optim import warmup_cosine
from magnets.metrics.codebook import CodebookUsage
from magnets.models.vq import VQConfig, VQTokenizer


class TokenizerModule(L.LightningModule):
    """Reconstruction (MSE) + codebook/commitment loss, with dead-code restarts.

    Metrics, per split (``val``, ``test``): ``recon_loss``, ``psnr`` (per-image
    mean, measured on the centred ``content_size`` crop so that padding does
    not flatter it), ``codebook_usage`` (fraction of codes used on the whole
    split) and ``perplexity``.
    """

    def __init__(
        self,
        model: dict[str, Any],
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
        self.model = VQTokenizer(VQConfig(**model))
        codebook_size = self.model.cfg.codebook_size
        self.metrics = torch.nn.ModuleDict(
            {
                split: torch.nn.ModuleDict(
                    {
                        "recon_loss": MeanMetric(),
                        "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
                        "usage": CodebookUsage(codebook_size),
                    }
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
        images, _ = batch
        recon, ids, vq_loss, latents = self.model(images)
        recon_loss = F.mse_loss(recon, images)
        loss = recon_loss + vq_loss
        self.log_dict({"train/loss": loss, "train/recon_loss": recon_loss, "train/vq_loss": vq_loss}, prog_bar=True)
        counts = torch.bincount(ids.flatten(), minlength=self.model.cfg.codebook_size).float()
        # The codebook may only change after the optimizer step: on_train_batch_end gets these.
        return {"loss": loss, "latents": latents.detach(), "counts": counts}

    def on_train_batch_end(self, outputs: dict[str, torch.Tensor], batch: Any, batch_idx: int) -> None:
        quantizer = self.model.quantizer
        counts = self.trainer.strategy.reduce(outputs["counts"], reduce_op="sum")
        quantizer.update_usage(counts, self.hparams.usage_decay)
        if (self.global_step % self.hparams.restart_every) != 0:
            return
        dead = quantizer.dead_codes(self.hparams.dead_threshold)
        if len(dead):
            latents = outputs["latents"]
            flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [B*h*w, D]
            pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
            # Every process restarts the same codes with rank 0's encoder outputs.
            # (moved through the CPU: a pickled CUDA tensor would land on rank 0's device)
            replacements = self.trainer.strategy.broadcast(flat[pick].cpu(), src=0).to(flat.device)
            quantizer.restart_codes(dead, replacements)
        self.log("train/dead_codes_restarted", float(len(dead)))

    def _eval_step(self, split: str, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, _ = batch
        recon, ids, _, _ = self.model(images)
        recon = recon.clamp(0, 1)
        metrics = self.metrics[split]
        metrics["recon_loss"].update(F.mse_loss(recon, images))
        metrics["psnr"].update(self._crop(recon), self._crop(images))
        metrics["usage"].update(ids)
        if batch_idx == 0:
            self._log_grid(split, images, recon)

    def _log_epoch(self, split: str) -> None:
        metrics = self.metrics[split]
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

    def _log_grid(self, split: str, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Originals (odd rows) above their reconstructions (even rows)."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or self.trainer.sanity_checking:
            return
        n = min(self.hparams.grid_images, len(images))
        per_row = 8
        n -= n % per_row
        if n == 0:
            return
        rows = [x[:n].view(n // per_row, per_row, *x.shape[1:]) for x in (images, recon)]  # 2 x [rows, 8, C, H, W]
        interleaved = torch.stack(rows, dim=1).flatten(0, 2)  # [2 * n, C, H, W]: a row of originals, then their recons
        grid = torchvision.utils.make_grid(interleaved, nrow=per_row, pad_value=0.5)  # [C, 2 * rows * (H+2), 8 * (W+2)]
        experiment.add_image(f"{split}/reconstructions", grid, self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay
        )
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_tokenizer(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> VQTokenizer:
    """The VQ tokenizer stored in a :class:`TokenizerModule` checkpoint, in eval mode."""
    ckpt = read_checkpoint(checkpoint, "tokenizer", map_location)
    return load_model_weights(VQTokenizer(VQConfig(**ckpt["hyper_parameters"]["model"])), ckpt, checkpoint)
