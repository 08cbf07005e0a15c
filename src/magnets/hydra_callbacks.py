"""Hydra callbacks that run before Hydra creates the run's folder.

``CheckOutputs`` tries the run (or sweep) folder before Hydra makes it, so an
unwritable ``paths.runs`` ends with one line and exit status 2 instead of
Hydra's traceback. It imports nothing heavy, so the line comes at once.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from magnets.files import unwritable_reason


def refuse_unwritable(config: DictConfig, folder_key: str) -> None:
    """Exit 2 with one line when the folder at ``folder_key`` (``hydra.run.dir``, ``hydra.sweep.dir``) cannot be
    written; the line names ``paths.runs``, the value a user sets."""
    folder = OmegaConf.select(config, folder_key)
    reason = unwritable_reason(folder, is_dir=True) if folder is not None else None
    if reason is not None:
        runs = OmegaConf.select(config, "paths.runs", default=None)
        setting = f"paths.runs={runs!r}" if runs is not None else f"{folder_key}={folder!r}"
        print(f"error: {setting}: the run folder {folder} cannot be created: {reason}; valid: a writable folder", file=sys.stderr)
        raise SystemExit(2)


class CheckOutputs(Callback):
    """Refuse an unwritable run or sweep folder before Hydra creates it (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unwritable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unwritable(config, "hydra.sweep.dir")
