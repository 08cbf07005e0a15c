"""What the model is conditioned on: the ``task`` config group, read by training and by decoding.

``class_cond``
    Generate every token of an item given its class label (images, UCF101).
``frame_pred``
    The first ``cond_frames`` frames of a clip are given. With the causal 3D
    tokenizer ``1 + f_t * c`` frames are exactly the first ``1 + c`` latent
    frames, i.e. the first ``(1 + c) * h * w`` tokens of the flat ``(t, h, w)``
    grid: those are never masked in training (so they carry no loss) and are
    revealed from the first decode step. The label is the null class unless
    ``use_class`` (for data that has classes).

A :class:`Task` is plain data (name, given tokens, use of the class); the
LightningModule saves it in its hyperparameters, so decoding a checkpoint
conditions exactly as its training did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from magnets.errors import ConfigError
from magnets.models.tokenizer import num_tokens, tokenizer_config

TASKS = ("class_cond", "frame_pred")


@dataclass(frozen=True)
class Task:
    """The conditioning of one experiment: ``given_tokens`` leading tokens of each item, and the class if ``use_class``."""

    name: str = "class_cond"
    given_tokens: int = 0
    use_class: bool = True

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ConfigError("task.name", self.name, TASKS)
        if self.given_tokens < 0 or (self.name == "class_cond" and self.given_tokens):
            raise ValueError(f"task {self.name!r} cannot give {self.given_tokens} tokens (class_cond gives none)")

    def as_dict(self) -> dict[str, Any]:
        """Plain fields, for hyperparameters and checkpoints."""
        return asdict(self)

    def check_fits(self, num_tokens_per_item: int) -> None:
        """At least one token per item is left to generate."""
        if self.given_tokens >= num_tokens_per_item:
            raise ValueError(f"task {self.name!r} gives {self.given_tokens} of {num_tokens_per_item} tokens: nothing to generate")

    def maskable(self, num_tokens_per_item: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions that may be masked ``[N]`` (bool): every one but the given leading tokens."""
        self.check_fits(num_tokens_per_item)
        return torch.arange(num_tokens_per_item, device=device) >= self.given_tokens

    def model_labels(self, labels: torch.Tensor, null_class: int) -> torch.Tensor:
        """The labels the model sees: ``labels``, or the null class everywhere when the task does not use the class."""
        return labels if self.use_class else torch.full_like(labels, null_class)

    def decode_start(self, real_tokens: torch.Tensor | None, batch: int, num_tokens_per_item: int, mask_id: int) -> torch.Tensor:
        """Tokens ``[B, N]`` a decode starts from: [MASK] everywhere but the given leading tokens, taken from ``real_tokens``."""
        self.check_fits(num_tokens_per_item)
        start = torch.full((batch, num_tokens_per_item), mask_id, dtype=torch.long)
        if self.given_tokens:
            if real_tokens is None or real_tokens.shape != (batch, num_tokens_per_item):
                found = None if real_tokens is None else list(real_tokens.shape)
                raise ValueError(f"task {self.name!r} decodes from real tokens [{batch}, {num_tokens_per_item}], got {found}")
            start = start.to(real_tokens.device)
            start[:, : self.given_tokens] = real_tokens[:, : self.given_tokens]
        elif real_tokens is not None:
            start = start.to(real_tokens.device)
        return start


def build_task(task_cfg: Mapping[str, Any], tokenizer_kind: str, tokenizer_model: Mapping[str, Any]) -> Task:
    """The :class:`Task` of a ``task`` config group for the configured tokenizer.

    ``frame_pred`` turns ``cond_frames`` into given latent frames with the
    tokenizer's own rule (``latent_frames_of``); a tokenizer without a time
    axis cannot predict frames.
    """
    name = task_cfg["name"]
    if name not in TASKS:
        raise ConfigError("task.name", name, TASKS)
    if name == "class_cond":
        return Task(name, 0, True)
    tokenizer = tokenizer_config(tokenizer_kind, tokenizer_model)
    if not hasattr(tokenizer, "latent_frames_of"):
        raise ConfigError("task", name, f"class_cond: tokenizer kind {tokenizer_kind!r} makes images, which have no frames")
    cond_frames = task_cfg["cond_frames"]
    try:
        latent = tokenizer.latent_frames_of(cond_frames)
    except ValueError as err:
        raise ConfigError("task.cond_frames", cond_frames, str(err)) from err
    grid = tuple(tokenizer.grid)
    if latent >= grid[0]:
        raise ConfigError(
            "task.cond_frames", cond_frames, f"fewer frames than the clip's {tokenizer.frames}: some must be predicted"
        )
    return Task(name, latent * num_tokens(grid[1:]), bool(task_cfg["use_class"]))


def task_of_hparams(hparams: Mapping[str, Any]) -> Task:
    """The task saved with a nested MaskGIT checkpoint (class-conditional for checkpoints that predate tasks)."""
    return Task(**hparams.get("task", {}))
