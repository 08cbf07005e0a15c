"""MaskGIT's ImageNet VQGAN (f16): 256x256 RGB images in ``[0, 1]`` to 16x16 grids of 1024 codes and back.

A convolutional VQGAN without attention: an encoder of residual blocks with
average-pool downsampling, a nearest-code lookup (squared l2 distance) into a
``[codebook_size, code_dim]`` codebook, and a decoder of residual blocks with
nearest-neighbour upsampling. The network takes images in ``[0, 1]`` as they
are and its decoder output is clamped to ``[0, 1]``.

Parameter names and shapes equal the keys of the public PyTorch port's weights
file :data:`MASKGIT_VQGAN_WEIGHTS` (layout read from github
``bytedance/1d-tokenizer`` ``modeling/modules/maskgit_vqgan.py``, itself from
``huggingface/open-muse`` ``muse/modeling_maskgit_vqgan.py``), so
:func:`load_maskgit_vqgan_weights` is a plain ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from magnets.errors import MismatchError, MissingFileError, load_error_summary
from magnets.models.tokenizer import check_code_ids, check_media_shape

MASKGIT_VQGAN_WEIGHTS = "maskgit-vqgan-imagenet-f16-256.bin"
"""File name of the public PyTorch port's weights (a ``torch.save``'d state dict) at the default config."""

_NORM_EPS = 1e-6  # GroupNorm epsilon of the trained weights
_SHOWN = 10  # how many names of each kind a weights mismatch message lists


@dataclass
class MaskGITVQGANConfig:
    """Architecture of the MaskGIT VQGAN; the defaults are the ImageNet 256x256 f16 model.

    The width at resolution ``H / 2**i`` is ``base_channels * channel_mult[i]``;
    there are ``len(channel_mult) - 1`` downsampling stages. ``norm_groups`` must
    divide every width (32 in the trained model; smaller widths need fewer).
    """

    in_channels: int = 3
    image_size: int = 256
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    code_dim: int = 256
    codebook_size: int = 1024
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = [int(m) for m in self.channel_mult]  # a Hydra ListConfig becomes a plain list
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks", "code_dim", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must list at least one positive multiplier, got {self.channel_mult}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} implied by channel_mult={self.channel_mult}"
            )
        bad_widths = [w for w in self.widths if w % self.norm_groups]
        if bad_widths:
            raise ValueError(
                f"norm_groups={self.norm_groups} does not divide the widths {bad_widths} "
                f"(base_channels={self.base_channels}, channel_mult={self.channel_mult})"
            )
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must lie in [2, 65536] (uint16 tokens), got {self.codebook_size}")

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, finest first."""
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``: ``image_size / downsample_factor`` on each side."""
        side = self.image_size // self.downsample_factor
        return (side, side)


def _norm(cfg: MaskGITVQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=_NORM_EPS)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, bias-free 3x3 conv, twice, plus a shortcut.

    Where the width changes, the shortcut is a 1x1 conv of the block's *output*
    (not of its input), so the block returns ``h + conv1x1(h)``: that is how the
    trained weights were wired, and loading them needs the same wiring.
    """

    def __init__(self, cfg: MaskGITVQGANConfig, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(h)
        return h + shortcut


class EncoderLevel(nn.Module):
    """Residual blocks at one resolution, then a 2x2 average pool unless it is the coarsest level."""

    def __init__(self, cfg: MaskGITVQGANConfig, level: int) -> None:
        super().__init__()
        c_in = cfg.base_channels if level == 0 else cfg.widths[level - 1]
        c_out = cfg.widths[level]
        self.block = nn.ModuleList([ResBlock(cfg, c_in if i == 0 else c_out, c_out) for i in range(cfg.num_res_blocks)])
        self.downsample = level < len(cfg.channel_mult) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class DecoderLevel(nn.Module):
    """Residual blocks at one resolution, then 2x nearest upsampling and a 3x3 conv unless it is the finest level."""

    def __init__(self, cfg: MaskGITVQGANConfig, level: int) -> None:
        super().__init__()
        widths = cfg.widths
        c_in = widths[min(level + 1, len(widths) - 1)]  # the width of the level below (coarser), or its own at the bottom
        c_out = widths[level]
        self.block = nn.ModuleList([ResBlock(cfg, c_in if i == 0 else c_out, c_out) for i in range(cfg.num_res_blocks)])
        self.upsample_conv = nn.Conv2d(c_out, c_out, 3, padding=1) if level > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """Images ``[B, C, H, W]`` -> latents ``[B, code_dim, H/f, W/f]``."""

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList([EncoderLevel(cfg, level) for level in range(len(cfg.channel_mult))])
        width = cfg.widths[-1]
        self.mid = nn.ModuleList([ResBlock(cfg, width, width) for _ in range(cfg.num_res_blocks)])
        self.norm_out = _norm(cfg, width)
        self.conv_out = nn.Conv2d(width, cfg.code_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Code vectors ``[B, code_dim, h, w]`` -> images ``[B, C, h*f, w*f]`` (unclamped)."""

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        width = cfg.widths[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, width, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(cfg, width, width) for _ in range(cfg.num_res_blocks)])
        # up[level] works at resolution H / 2**level; they run coarsest first.
        self.up = nn.ModuleList([DecoderLevel(cfg, level) for level in range(len(cfg.channel_mult))])
        self.norm_out = _norm(cfg, cfg.widths[0])
        self.conv_out = nn.Conv2d(cfg.widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(codes)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Codebook(nn.Module):
    """``codebook_size`` code vectors of ``code_dim``; a latent's code is the one at least squared l2 distance."""

    def __init__(self, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids of the nearest codes: ``[B, D, h, w]`` -> ``[B, h, w]``.

        Distances are ``|z|^2 + |e|^2 - 2 z.e`` in float32 (also under autocast);
        ties go to the lowest id.
        """
        b, d, h, w = latents.shape
        with torch.autocast(latents.device.type, enabled=False):
            flat = latents.float().permute(0, 2, 3, 1).reshape(b * h * w, d)  # [B*h*w, D]
            codes = self.embedding.weight.float()  # [V, D]
            distances = (
                flat.pow(2).sum(dim=1, keepdim=True) + codes.pow(2).sum(dim=1)[None, :] - 2 * flat @ codes.t()
            )  # [B*h*w, V]
            ids = distances.argmin(dim=1)
        return ids.view(b, h, w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors of code ids: ``[B, h, w]`` -> ``[B, D, h, w]``."""
        return self.embedding(ids).permute(0, 3, 1, 2)


class MaskGITVQGAN(nn.Module):
    """Images in ``[0, 1]`` to code ids and back (the ``maskgit_vqgan`` kind of ``magnets.models.tokenizer``).

    Built untrained; :func:`load_maskgit_vqgan_weights` loads the public weights file.
    """

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Codebook(cfg.codebook_size, cfg.code_dim)

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def _check_images(self, images: torch.Tensor) -> None:
        check_media_shape(images, (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size), "images")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[0, 1]`` -> code ids ``[B, h, w]`` (int64)."""
        self._check_images(images)
        return self.quantize.lookup(self.encoder(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, h, w]`` -> images ``[B, C, H, W]`` float32 clamped to ``[0, 1]``."""
        check_code_ids(ids, self.grid)
        return self.decoder(self.quantize.embed(ids.long())).float().clamp(0, 1)


def _listing(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} {kind}: {shown}"


def load_maskgit_vqgan_weights(model: MaskGITVQGAN, path: str | Path) -> MaskGITVQGAN:
    """Load the public weights file at ``path`` into ``model``; returns ``model`` in eval mode.

    The file is a ``torch.save``'d state dict (or one under a ``"state_dict"`` or
    ``"model"`` key) whose keys and shapes must equal ``model.state_dict()``'s.
    Raises ``MissingFileError`` if there is no file and ``MismatchError`` if it is
    unreadable or its keys or shapes differ (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"MaskGIT VQGAN weights file {path} does not exist (expected {MASKGIT_VQGAN_WEIGHTS})")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means: not a weights file
        raise MismatchError(
            f"cannot read MaskGIT VQGAN weights file {path} as a torch state dict: {load_error_summary(err)}"
        ) from None
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise MismatchError(f"MaskGIT VQGAN weights file {path} holds a {type(loaded).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise MismatchError(
            f"MaskGIT VQGAN weights file {path} is not a state dict: {_listing('non-tensor entries', not_tensors)}"
        )

    expected = model.state_dict()
    missing = [k for k in expected if k not in loaded]
    unexpected = [str(k) for k in loaded if k not in expected]
    wrong_shape = [
        f"{k} (file {list(loaded[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            _listing(kind, names)
            for kind, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
            if names
        ]
        raise MismatchError(
            f"MaskGIT VQGAN weights file {path} does not fit the model config {model.cfg}: " + "; ".join(problems)
        )
    model.load_state_dict(loaded, strict=True)
    return model.eval()
