"""2D VQ image tokenizer: conv encoder, l2-normalised codebook lookup, conv decoder.

An image ``[B, C, H, W]`` becomes a grid of code ids ``[B, H/f, W/f]`` where
``f = 2 ** (len(channels) - 1)`` is the downsampling factor. The lookup is
factorised and l2-normalised (codes live on the unit sphere of a small
``code_dim``), and codes that fall out of use are restarted from encoder
outputs, so the codebook stays in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from magnets.models.tokenizer import check_code_ids, check_media_shape


@dataclass
class VQConfig:
    """Architecture of the VQ tokenizer.

    ``channels[i]`` is the width at resolution ``H / 2**i``; the number of
    stride-2 stages is ``len(channels) - 1``.
    """

    in_channels: int = 1
    image_size: int = 32
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    num_res_blocks: int = 2
    code_dim: int = 16
    codebook_size: int = 512
    commitment_weight: float = 0.25

    def __post_init__(self) -> None:
        if len(self.channels) < 1:
            raise ValueError(f"channels must list at least one width, got {self.channels}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} implied by channels={self.channels}"
            )
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must lie in [2, 65536] (uint16 tokens), got {self.codebook_size}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``: ``image_size / downsample_factor`` on each side."""
        side = self.image_size // self.downsample_factor
        return (side, side)


class ResBlock(nn.Module):
    """Pre-activation residual block: GroupNorm, SiLU, 3x3 conv, twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = min(8, channels)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)]
        for c_in, c_out in pairwise(cfg.channels):
            layers += [nn.SiLU(), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [ResBlock(cfg.channels[-1]) for _ in range(cfg.num_res_blocks)]
        layers += [nn.GroupNorm(min(8, cfg.channels[-1]), cfg.channels[-1]), nn.SiLU()]
        layers += [nn.Conv2d(cfg.channels[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        widths = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1)]
        layers += [ResBlock(widths[0]) for _ in range(cfg.num_res_blocks)]
        for c_in, c_out in pairwise(widths):
            layers += [nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


class VectorQuantizer(nn.Module):
    """Nearest-code lookup on the unit sphere with a straight-through gradient.

    Keeps an exponential moving average of how often each code is chosen
    (``usage``); :meth:`restart_dead_codes` moves codes whose usage fell below
    a threshold onto encoder outputs.
    """

    usage: torch.Tensor

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=1))
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids of the nearest codes: ``[B, D, *grid]`` -> ``[B, *grid]``."""
        d = latents.shape[1]
        flat = F.normalize(latents.float(), dim=1).movedim(1, -1).reshape(-1, d)  # [B * prod(grid), D]
        # On the unit sphere the nearest code is the one of largest cosine.
        with torch.autocast(latents.device.type, enabled=False):  # code choice in fp32, as in tokenization
            ids = (flat @ self.normalized_codebook().float().t()).argmax(dim=1)
        return ids.view(latents.shape[0], *latents.shape[2:])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors of code ids: ``[B, *grid]`` -> ``[B, D, *grid]``."""
        return F.embedding(ids, self.normalized_codebook()).movedim(-1, 1)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``latents`` ``[B, D, *grid]``.

        Returns the quantised latents (straight-through), the code ids
        ``[B, *grid]`` and the codebook + commitment loss.
        """
        latents = F.normalize(latents, dim=1)
        ids = self.lookup(latents)
        quantized = self.embed(ids)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commitment_loss = F.mse_loss(latents, quantized.detach())
        loss = codebook_loss + self.commitment_weight * commitment_loss
        quantized = latents + (quantized - latents).detach()
        return quantized, ids, loss

    @torch.no_grad()
    def update_usage(self, counts: torch.Tensor, decay: float) -> None:
        """Fold one batch's code counts ``[V]`` into the usage average."""
        self.usage.mul_(decay).add_(counts / counts.sum().clamp_min(1), alpha=1 - decay)

    @torch.no_grad()
    def dead_codes(self, threshold: float) -> torch.Tensor:
        """Ids of codes whose usage is below ``threshold`` times uniform usage."""
        return (self.usage < threshold / self.codebook_size).nonzero().flatten()

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, replacements: torch.Tensor) -> None:
        """Move codes ``dead`` ``[n]`` onto ``replacements`` ``[n, D]`` and reset their usage."""
        self.codebook[dead] = F.normalize(replacements, dim=1)
        self.usage[dead] = 1.0 / self.codebook_size


class VQTokenizer(nn.Module):
    """Images in ``[0, 1]`` to code ids and back (the ``vq2d`` kind of ``magnets.models.tokenizer``)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment_weight)
        self.decoder = Decoder(cfg)

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def _check_images(self, images: torch.Tensor) -> None:
        check_media_shape(images, (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size), "images")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns reconstruction ``[B, C, H, W]``, code ids ``[B, h, w]``, VQ loss, encoder latents."""
        self._check_images(images)
        latents = self.encoder(images * 2 - 1)
        quantized, ids, vq_loss = self.quantizer(latents)
        recon = self.decoder(quantized) * 0.5 + 0.5
        return recon, ids, vq_loss, latents

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[0, 1]`` -> code ids ``[B, h, w]``."""
        self._check_images(images)
        return self.quantizer.lookup(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, h, w]`` -> images ``[B, C, H, W]`` clamped to ``[0, 1]``."""
        check_code_ids(ids, self.grid)
        return (self.decoder(self.quantizer.embed(ids)) * 0.5 + 0.5).clamp(0, 1)
