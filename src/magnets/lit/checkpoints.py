"""Reading the model out of a LightningModule checkpoint, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from magnets.errors import MismatchError, MissingFileError, load_error_summary

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def read_checkpoint(path: str | Path, kind: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path``; it must hold ``hyper_parameters['model']`` and a ``state_dict``.

    ``kind`` names what the caller expects (e.g. "tokenizer") in the errors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{kind} checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a corrupt archive
        raise MismatchError(f"{path} is not a readable checkpoint ({load_error_summary(err)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt.get("hyper_parameters", {}) or "state_dict" not in ckpt:
        raise MismatchError(f"{path} is not a {kind} checkpoint: it has no hyper_parameters['model'] and state_dict")
    return ckpt


def load_model_weights(model: ModuleT, ckpt: dict[str, Any], path: str | Path) -> ModuleT:
    """Load the ``model.*`` entries of a LightningModule checkpoint's state dict into ``model``; eval mode."""
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        config = ckpt["hyper_parameters"]["model"]
        raise MismatchError(f"{path}: weights do not match its own model config {config}: {err}") from err
    return model.eval()
