"""Callbacks shared by every training stage."""

from __future__ import annotations

from typing import Any

import lightning as L


class ConfigInCheckpoint(L.Callback):
    """Stores the run's resolved config under ``checkpoint['config']`` in every checkpoint."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.config


class ProvenanceInCheckpoint(L.Callback):
    """Stores what a stage's output was made from under ``checkpoint['provenance']`` in every checkpoint (for the nested
    MaskGIT: the tokenizer of its tokens and each token split's identity, :func:`magnets.pipeline.token_provenance`)."""

    def __init__(self, provenance: dict[str, Any]) -> None:
        self.provenance = provenance

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["provenance"] = self.provenance
