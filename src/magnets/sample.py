"""Decode a grid of samples from a trained checkpoint with a model schedule: one row per class, or predicted clips.

    python -m magnets.sample [experiment=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
    make sample EXP=fmnist ARGS="schedule=maskgit_12 decode.cache=none"

Writes the samples through the media writer (``grid.png`` for images, one
row per class; ``grid.gif`` and ``grid_frames.png`` for clips; under frame
prediction also ``real.gif`` / ``real_frames.png``, the clips the predictions
continue) and ``samples.npz`` (tokens, labels, schedule, cache, GFLOPs per
sample) to ``out_dir`` (default: the checkpoint's run directory,
``samples/<schedule>_<cache>/``) and prints the GFLOPs per sample against the
uncached full-model baseline with the same number of steps.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from magnets.cli import check_sample_config, run_entry


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Decode ``samples_per_class`` samples of every class; write the grid and tokens; return a summary
    (:func:`magnets.evaluation.sample_grid`, imported here: torch loads only once the config passed its check)."""
    from magnets.evaluation import sample_grid

    return sample_grid(cfg)


@hydra.main(config_path="../../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(sample, cfg, check_sample_config)


if __name__ == "__main__":
    main()
