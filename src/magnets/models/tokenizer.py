"""The tokenizer seam: media (images or video clips) to grids of code ids and back.

Everything downstream of a tokenizer (token shards, the transformer, decoding)
sees only ``grid`` and ``codebook_size``; what the media are lives here and in
the datamodules. A tokenizer kind is registered in :data:`TOKENIZER_KINDS` by
name with its config dataclass and model class, and built by
:func:`build_tokenizer` from the ``tokenizer`` config group's ``kind`` and
``model``.

Media are float in ``[0, 1]``: images ``[B, C, H, W]``, clips ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from magnets.choices import PRETRAINED_KINDS, TOKENIZER_KINDS


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the project may assume about a tokenizer."""

    @property
    def grid(self) -> tuple[int, ...]:
        """Token grid of one item: ``(h, w)`` for images, ``(t, h, w)`` for clips."""
        ...

    @property
    def codebook_size(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Media float ``[B, C, *spatial]`` in ``[0, 1]`` -> code ids ``[B, *grid]``."""
        ...

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, *grid]`` -> media float ``[B, C, *spatial]`` clamped to ``[0, 1]``."""
        ...


class TrainableTokenizer(Tokenizer, Protocol):
    """A tokenizer the project trains (``magnets.lit.tokenizer.TokenizerModule``)."""

    @property
    def quantizer(self) -> nn.Module:
        """The quantizer of the latents (``VectorQuantizer`` or ``FSQ``)."""
        ...

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (like ``x``), code ids ``[B, *grid]``, quantizer loss, latents ``[B, D, *grid]``."""
        ...

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`, through ``nn.Module.__call__``."""
        ...


def load_pretrained_tokenizer(kind: str, model: Mapping[str, Any], weights: str | Path) -> nn.Module:
    """A tokenizer of a :data:`PRETRAINED_KINDS` kind with architecture ``model``, its weights read from ``weights``."""
    if kind not in PRETRAINED_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is trained here, not loaded; pretrained kinds: {sorted(PRETRAINED_KINDS)}")
    module_name, loader_name = PRETRAINED_KINDS[kind]
    load = getattr(importlib.import_module(module_name), loader_name)
    return load(build_tokenizer(kind, model), weights)


def tokenizer_classes(kind: str) -> tuple[type, type[nn.Module]]:
    """The config dataclass and model class registered as ``kind``."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: {sorted(TOKENIZER_KINDS)}")
    module_name, config_name, model_name = TOKENIZER_KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def tokenizer_config(kind: str, model: Mapping[str, Any]) -> Any:
    """The config dataclass of ``kind`` built from the ``model`` mapping (raises on unknown fields)."""
    config_class, _ = tokenizer_classes(kind)
    try:
        return config_class(**model)
    except TypeError as err:
        raise ValueError(f"tokenizer kind {kind!r}: bad model config {dict(model)} ({err})") from err


def build_tokenizer(kind: str, model: Mapping[str, Any]) -> nn.Module:
    """An untrained tokenizer of ``kind`` with architecture ``model``."""
    _, model_class = tokenizer_classes(kind)
    return model_class(tokenizer_config(kind, model))


def check_media_shape(media: torch.Tensor, item_shape: tuple[int, ...], what: str) -> None:
    """A ValueError unless ``media`` is a batch ``[B, *item_shape]`` (``what``: "images" or "clips", for the message)."""
    if media.dim() != len(item_shape) + 1 or tuple(media.shape[1:]) != tuple(item_shape):
        raise ValueError(f"expected {what} of shape [B, {', '.join(map(str, item_shape))}], got {list(media.shape)}")


def check_code_ids(ids: torch.Tensor, grid: tuple[int, ...]) -> None:
    """A ValueError unless ``ids`` is a batch of integer code ids ``[B, *grid]``."""
    check_media_shape(ids, grid, "code ids")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"expected integer code ids, got dtype {ids.dtype}")


def token_grid(kind: str, model: Mapping[str, Any]) -> tuple[int, ...]:
    """The token grid a tokenizer config produces, without building the network."""
    return tuple(tokenizer_config(kind, model).grid)


def num_tokens(grid: tuple[int, ...] | list[int]) -> int:
    """Tokens per item of a token grid (the one home of ``prod(grid)``)."""
    return math.prod(grid)
