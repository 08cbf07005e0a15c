"""Train an experiment end to end: tokenizer, token shards of every split, classifier, nested MaskGIT.

    python -m magnets.train experiment=NAME [hydra overrides]      (make train EXP=NAME ARGS="...")

The stages and their skip/resume rules are in :mod:`magnets.pipeline`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from magnets.cli import check_train_config, run_entry


def run_stages(cfg: DictConfig) -> None:
    """The stages (:func:`magnets.pipeline.train`), imported once the config passed its check: torch and Lightning take
    seconds to load, a config error is reported before them."""
    from magnets.pipeline import train

    train(cfg)


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(run_stages, cfg, check_train_config)


if __name__ == "__main__":
    main()
