"""Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505).

Each of ``d = len(levels)`` latent channels is squashed by ``tanh`` into a
range holding ``levels[i]`` integers and rounded to the nearest one, with a
straight-through gradient. The codebook is the implicit grid of all level
combinations, ``prod(levels)`` codes, so there is nothing to learn, no code
can die and there is no codebook or commitment loss. A code's id is its
mixed-radix index: ``id = sum_i digit_i * prod(levels[:i])`` with
``digit_i in [0, levels[i])``.

The interface mirrors :class:`magnets.models.vq.VectorQuantizer`
(``forward``, ``lookup``, ``embed`` on channel-first latents ``[B, d, *grid]``)
so a tokenizer can hold either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Keeps tanh's range strictly inside the outermost rounding intervals, so the
# extreme levels are reached without the bound ever rounding past them.
BOUND_EPS = 1e-3


class FSQ(nn.Module):
    """Finite scalar quantizer over ``len(levels)`` channels with ``prod(levels)`` codes."""

    levels: torch.Tensor
    basis: torch.Tensor
    half_width: torch.Tensor

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        if len(levels) < 1 or any(int(n) < 2 for n in levels):
            raise ValueError(f"FSQ levels must be one or more integers >= 2, got {list(levels)}")
        self.levels_list = [int(n) for n in levels]
        self.codebook_size = math.prod(self.levels_list)
        if self.codebook_size > 65536:
            raise ValueError(f"FSQ levels {self.levels_list} give {self.codebook_size} codes; tokens are uint16 (at most 65536)")
        levels_t = torch.tensor(self.levels_list, dtype=torch.int64)
        # basis[i] = prod(levels[:i]): the place value of channel i in the mixed-radix id.
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels_t[:-1]]), dim=0)
        # Buffers (not persistent: they follow from ``levels``) so they move with the module's device.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", levels_t // 2, persistent=False)

    @property
    def dim(self) -> int:
        """Number of latent channels quantised (one per entry of ``levels``)."""
        return len(self.levels_list)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash channel-last ``z`` ``[..., d]`` so that rounding gives ``levels[i]`` integers per channel.

        Odd ``L``: the range is ``(-(L-1)/2, (L-1)/2)`` and rounds to ``-(L-1)/2 .. (L-1)/2``.
        Even ``L``: the range is shifted down by one half, ``(-L/2, L/2 - 1)``, so it
        rounds to ``-L/2 .. L/2 - 1``; ``shift`` moves ``z = 0`` back to about 0
        (``tan``, as in the paper's code: ``atanh`` would be exact but is undefined for ``L = 2``).
        """
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 - BOUND_EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Channel-last ``z`` ``[..., d]`` -> codes ``[..., d]`` in ``[-1, 1]``, straight-through gradient."""
        bounded = self.bound(z)
        # round() has zero gradient: pass the gradient of ``bounded`` straight through.
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self.half_width.to(z.dtype)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Channel-last codes ``[..., d]`` (values on the grid) -> int64 ids ``[...]``."""
        digits = torch.round(codes * self.half_width + self.half_width).long()  # [..., d] in [0, levels)
        return (digits * self.basis).sum(dim=-1)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Int64 ids ``[...]`` -> channel-last codes ``[..., d]`` in ``[-1, 1]``."""
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels  # [..., d]
        return (digits - self.half_width).float() / self.half_width

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise channel-first ``latents`` ``[B, d, *grid]``.

        Returns the codes ``[B, d, *grid]`` (straight-through), the code ids
        ``[B, *grid]`` and a zero loss (FSQ has no codebook to fit).
        """
        self._check_channels(latents)
        # Quantise in fp32: under autocast a half-precision bound could round to a different level.
        codes = self.quantize(latents.float().movedim(1, -1))  # [B, *grid, d]
        ids = self.codes_to_ids(codes.detach())
        return codes.movedim(-1, 1).to(latents.dtype), ids, latents.new_zeros(())

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids of ``latents``: ``[B, d, *grid]`` -> ``[B, *grid]``."""
        self._check_channels(latents)
        return self.codes_to_ids(self.quantize(latents.float().movedim(1, -1)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of code ids: ``[B, *grid]`` -> ``[B, d, *grid]``."""
        return self.ids_to_codes(ids).movedim(-1, 1)

    def _check_channels(self, latents: torch.Tensor) -> None:
        if latents.dim() < 2 or latents.shape[1] != self.dim:
            raise ValueError(
                f"FSQ with levels {self.levels_list} expects latents [B, {self.dim}, ...], got {list(latents.shape)}"
            )
