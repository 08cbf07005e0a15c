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
