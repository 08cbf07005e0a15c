"""Train an experiment end to end: VQ tokenizer, then token shards of every split.

    python -m magnets.train experiment=NAME [hydra overrides]      (make train EXP=NAME ARGS="...")

Each stage is skipped when its output exists and matches the config: the
tokenizer when ``<tokenizer.dir>/tokenizer.ckpt`` exists (an interrupted
tokenizer run resumes from ``checkpoints/last.ckpt``), a token shard when it
holds this tokenizer's tokens.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from magnets.data.images import build_image_datamodule
from magnets.lit.callbacks import ConfigInCheckpoint
from magnets.lit.tokenizer import TokenizerModule
from magnets.tokenize import tokenize

log = logging.getLogger(__name__)


def check_tokenizer_matches(checkpoint: Path, model_cfg: dict[str, Any]) -> None:
    """Refuse to reuse a tokenizer checkpoint trained with another architecture."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("hyper_parameters", {}).get("model")
    if saved != model_cfg:
        diffs = sorted(k for k in set(saved or {}) | set(model_cfg) if (saved or {}).get(k) != model_cfg.get(k))
        raise ValueError(
            f"tokenizer checkpoint {checkpoint} was trained with another model config (fields {diffs}: "
            f"saved {[(saved or {}).get(k) for k in diffs]}, configured {[model_cfg.get(k) for k in diffs]}). "
            "Give the tokenizer a new tokenizer.name, or delete that checkpoint to retrain it."
        )


def fit_tokenizer(cfg: DictConfig) -> Path:
    """Train the tokenizer unless its final checkpoint exists; returns that checkpoint's path.

    Also evaluates it on the test split and writes ``metrics.json`` beside it.
    """
    tok_dir = Path(cfg.tokenizer.dir)
    final = tok_dir / "tokenizer.ckpt"
    model_cfg = OmegaConf.to_container(cfg.tokenizer.model, resolve=True)
    if final.exists():
        check_tokenizer_matches(final, model_cfg)
        log.info("tokenizer %s exists; skipping its training", final)
        return final

    datamodule = build_image_datamodule(cfg.data)
    # Plain containers, so that checkpoints hold no OmegaConf objects.
    optim, codebook = (OmegaConf.to_container(cfg.tokenizer[key], resolve=True) for key in ("optim", "codebook"))
    module = TokenizerModule(model=model_cfg, **optim, **codebook, content_size=datamodule.content_size)
    last = tok_dir / "checkpoints" / "last.ckpt"
    trainer = L.Trainer(
        **cfg.trainer,
        **cfg.tokenizer.trainer,
        default_root_dir=tok_dir,
        logger=TensorBoardLogger(tok_dir, name="tensorboard", version="", default_hp_metric=False),
        callbacks=[
            ModelCheckpoint(
                dirpath=tok_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.tokenizer.checkpoint_every
            ),
            # Ctrl-C or a crash saves the state reached, as last.ckpt: a rerun continues from it.
            OnExceptionCheckpoint(dirpath=tok_dir / "checkpoints", filename="last"),
            ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)),
            TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate),
        ],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.exists() else None)
    if not trainer.state.finished:
        raise RuntimeError(f"tokenizer training stopped early ({trainer.state.status}); rerun to resume from {last}")
    (test_metrics,) = trainer.test(module, datamodule=datamodule)

    tmp = final.with_name(f".{final.name}.partial")
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        os.replace(tmp, final)  # the final checkpoint appears only when complete
        (tok_dir / "metrics.json").write_text(json.dumps({k: float(v) for k, v in test_metrics.items()}, indent=2) + "\n")
        log.info("tokenizer test metrics: %s", test_metrics)
    trainer.strategy.barrier()
    return final


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of the experiment; returns the outputs of each stage."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer_ckpt = fit_tokenizer(cfg)
    shards = {}
    if rank_zero_only.rank == 0:  # one process writes the shards; the others wait for it
        shards = tokenize(cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {"tokenizer": tokenizer_ckpt, "shards": shards}


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
