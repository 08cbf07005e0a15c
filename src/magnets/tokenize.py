"""Encode the media splits of an experiment with a trained tokenizer into token shards.

    python -m magnets.tokenize [experiment=NAME] [tokenize.splits=[train,val]] [tokenize.checkpoint=PATH]
    torchrun --nproc-per-node=8 -m magnets.tokenize experiment=NAME      # 8 processes share the shards
    python -m magnets.tokenize experiment=imagenet_b tokenizer.weights=FILE tokenize.rank=R tokenize.world_size=W

Each split becomes numbered shards of ``tokenize.items_per_shard`` source
items, ``<tokenize.out_dir>/<split>/shard-NNNNN/``, and a ``report.json``
listing every unreadable file (:mod:`magnets.data.tokenization`). A shard
that already holds this tokenizer's tokens of the same items is skipped, so
a rerun after a crash writes only the missing ones. Shard ``i`` is written by
rank ``i % world_size`` (``tokenize.rank``/``tokenize.world_size``, or
torchrun's / srun's environment): several processes or nodes take disjoint
shards, and a process exits when its own are written.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from magnets.cli import check_data, check_tokenize, check_tokenizer, check_tokenizer_fits_data, run_entry


def check_tokenize_config(cfg: DictConfig) -> None:
    check_data(cfg.data)
    check_tokenizer_fits_data(cfg)
    check_tokenize(cfg.tokenize)
    check_tokenizer(cfg.tokenizer)  # imports torch: after the plain checks


def write_shards(cfg: DictConfig) -> None:
    """This process's shards (:func:`magnets.pipeline.tokenize_command`), imported once the config passed its check."""
    from magnets.pipeline import tokenize_command

    tokenize_command(cfg)


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(write_shards, cfg, check_tokenize_config)


if __name__ == "__main__":
    main()
