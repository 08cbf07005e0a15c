"""Encode the media splits of an experiment with a trained tokenizer into token shards.

    python -m magnets.tokenize [experiment=NAME] [tokenize.splits=[train,val]] [tokenize.checkpoint=PATH]

A split whose shard already holds this tokenizer's tokens (same checkpoint
sha256, same augmentation, same count) is skipped (:mod:`magnets.data.tokenization`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from magnets.cli import check_data, check_tokenize, check_tokenizer, check_tokenizer_fits_data, run_entry
from magnets.pipeline import tokenize


def check_tokenize_config(cfg: DictConfig) -> None:
    check_data(cfg.data)
    check_tokenizer(cfg.tokenizer)
    check_tokenizer_fits_data(cfg)
    check_tokenize(cfg.tokenize)


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(tokenize, cfg, check_tokenize_config)


if __name__ == "__main__":
    main()
