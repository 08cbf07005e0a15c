"""The stages of an experiment: tokenizer, token shards of every split, classifier, nested MaskGIT.

``train(cfg)`` runs them in order (``python -m magnets.train``). Each stage
is skipped when its output exists and matches the config: the tokenizer when
``<tokenizer.dir>/tokenizer.ckpt`` exists (an interrupted tokenizer run
resumes from the newer of ``checkpoints/last.ckpt`` and
``checkpoints/interrupted.ckpt``), a token shard when it holds this
tokenizer's tokens, the classifier (class accuracy and FID of samples at
validation, ``sample_validation``) when ``classifier.path`` exists. The
nested MaskGIT stage writes to the run directory (``run_dir``);
``resume=last`` continues the newest run of the experiment from its last
checkpoint (step, optimizer, LR schedule, data order). Run-directory rules
live in :mod:`magnets.runs`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from magnets.data.base import build_datamodule
from magnets.data.shards import TokenDataModule, TokenDataset
from magnets.data.tokenization import tokenize_splits
from magnets.errors import DataNotFoundError, MismatchError
from magnets.files import atomic_write_json, atomic_write_text, file_sha256
from magnets.lit.callbacks import ConfigInCheckpoint
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.lit.sampling_validation import SamplingValidation
from magnets.lit.tokenizer import TokenizerModule, load_tokenizer
from magnets.metrics.classifier import fit_classifier
from magnets.metrics.extractors import domain_classifier_features
from magnets.metrics.fid import feature_stats
from magnets.models.tokenizer import num_tokens, tokenizer_config
from magnets.models.transformer import MODEL_SIZES
from magnets.runs import (
    INTERRUPTED_NAME,
    check_resume_compatible,
    checkpoint_dir,
    last_checkpoint,
    own_resume_checkpoint,
    resume_checkpoint,
    save_checkpoint_atomically,
    shard_dir,
    tokenizer_final_checkpoint,
)
from magnets.sampling import SamplingSettings, load_schedule
from magnets.task import Task, build_task

log = logging.getLogger(__name__)


def check_tokenizer_matches(checkpoint: Path, kind: str, model_cfg: dict[str, Any]) -> None:
    """Refuse to reuse a tokenizer checkpoint trained with another kind or architecture."""
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    saved_kind, saved = hparams.get("kind", "vq2d"), hparams.get("model")
    if saved_kind != kind:
        raise MismatchError(
            f"tokenizer checkpoint {checkpoint} is of kind {saved_kind!r}, the config asks for {kind!r}. "
            "Give the tokenizer a new tokenizer.name, or delete that checkpoint to retrain it."
        )
    if saved != model_cfg:
        diffs = sorted(k for k in set(saved or {}) | set(model_cfg) if (saved or {}).get(k) != model_cfg.get(k))
        raise MismatchError(
            f"tokenizer checkpoint {checkpoint} was trained with another model config (fields {diffs}: "
            f"saved {[(saved or {}).get(k) for k in diffs]}, configured {[model_cfg.get(k) for k in diffs]}). "
            "Give the tokenizer a new tokenizer.name, or delete that checkpoint to retrain it."
        )


LOGGERS = ("tensorboard", "csv")


def build_logger(kind: str, out_dir: Path) -> TensorBoardLogger | CSVLogger:
    """The ``logger`` group's logger, writing into ``out_dir/<kind>``."""
    if kind == "tensorboard":
        return TensorBoardLogger(out_dir, name="tensorboard", version="", default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(out_dir, name="csv", version="")
    raise ValueError(f"unknown logger {kind!r}; valid: {list(LOGGERS)}")


def stage_trainer(
    cfg: DictConfig, out_dir: Path, stage_args: DictConfig, checkpoint_every: int, callbacks: list[L.Callback] = ()
) -> L.Trainer:
    """A Trainer for one stage writing to ``out_dir``: ``checkpoints/``, ``tensorboard/``.

    ``cfg.trainer`` (devices, strategy, precision) and the stage's own
    arguments (``max_steps``, ...) configure it. ``checkpoints/last.ckpt`` is
    saved every ``checkpoint_every`` steps and ``checkpoints/interrupted.ckpt``
    when a run crashes or is interrupted; :func:`own_resume_checkpoint` picks the
    later of the two, so a rerun continues from where it stopped.
    """
    return L.Trainer(
        **{**cfg.trainer, **stage_args},  # a stage's own arguments win
        default_root_dir=out_dir,
        logger=build_logger(cfg.logger.kind, out_dir),
        callbacks=[
            ModelCheckpoint(dirpath=checkpoint_dir(out_dir), save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every),
            # Lightning deletes this one when a run ends normally: it exists only after a crash or Ctrl-C.
            OnExceptionCheckpoint(dirpath=checkpoint_dir(out_dir), filename=INTERRUPTED_NAME),
            ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)),
            TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate),
            *callbacks,
        ],
    )


# Exit status of a stage stopped by SIGTERM (128 + 15, as a shell reports a process the signal ended): a scheduler
# must not count a preempted job as finished.
PREEMPTED_EXIT_STATUS = 143


def fit_stage(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Path | None) -> None:
    """``trainer.fit``, turning a preemption into a non-zero exit.

    On SIGTERM Lightning stops at the next batch, its ``OnExceptionCheckpoint``
    saves ``checkpoints/interrupted.ckpt`` (:func:`stage_trainer`) and it raises
    ``SIGTERMException``, a ``SystemExit`` of status 0. Here that becomes
    :data:`PREEMPTED_EXIT_STATUS`; started again in the same directory (a
    requeued job) or with ``resume=last``, the stage continues from that checkpoint.
    """
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stage_dir = checkpoint_dir(trainer.default_root_dir)
        log.error("stopped by SIGTERM at step %d; checkpoint in %s (rerun to resume)", trainer.global_step, stage_dir)
        raise SystemExit(PREEMPTED_EXIT_STATUS) from None
    if not trainer.state.finished:
        raise RuntimeError(f"training stopped early ({trainer.state.status}); rerun with resume=last to continue")


def fit_tokenizer(cfg: DictConfig) -> Path:
    """Train the tokenizer unless its final checkpoint exists; returns that checkpoint's path.

    Also evaluates it on the test split and writes ``metrics.json`` beside it.
    """
    tok_dir = Path(cfg.tokenizer.dir)
    final = tokenizer_final_checkpoint(tok_dir)
    model_cfg = OmegaConf.to_container(cfg.tokenizer.model, resolve=True)
    if final.exists():
        check_tokenizer_matches(final, cfg.tokenizer.kind, model_cfg)
        log.info("tokenizer %s exists; skipping its training", final)
        return final

    datamodule = build_datamodule(cfg.data)
    # Find (or make) the data before a Trainer exists: a missing dataset is then one clear error, not a failure inside fit.
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Plain containers, so that checkpoints hold no OmegaConf objects.
    optim, codebook = (OmegaConf.to_container(cfg.tokenizer[key], resolve=True) for key in ("optim", "codebook"))
    module = TokenizerModule(
        model=model_cfg,
        kind=cfg.tokenizer.kind,
        **optim,
        **codebook,
        content_size=getattr(datamodule, "content_size", None),
    )
    trainer = stage_trainer(cfg, tok_dir, cfg.tokenizer.trainer, cfg.tokenizer.checkpoint_every)
    resume = own_resume_checkpoint(tok_dir)
    if resume is not None:
        check_tokenizer_matches(resume, cfg.tokenizer.kind, model_cfg)
    fit_stage(trainer, module, datamodule, resume)
    (test_metrics,) = trainer.test(module, datamodule=datamodule)

    save_checkpoint_atomically(trainer, final)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in test_metrics.items()}
        metrics["bits_per_pixel"] = token_bits_per_pixel(module.model.grid, module.model.codebook_size, datamodule.media_info())
        atomic_write_json(tok_dir / "metrics.json", metrics)
        log.info("tokenizer test metrics: %s", test_metrics)
    trainer.strategy.barrier()
    return final


def token_bits_per_pixel(grid: tuple[int, ...], codebook_size: int, media: dict[str, Any]) -> float:
    """Bits of the token grid per pixel position (per frame pixel for clips): ``prod(grid) log2(V) / (T H W)``."""
    height, width = media["resolution"]
    frames = media.get("frames", 1) if media["kind"] == "video" else 1
    return num_tokens(grid) * math.log2(codebook_size) / (frames * height * width)


def maskgit_model_config(cfg: DictConfig) -> dict[str, Any]:
    """Transformer config: the size's dimensions, the widths, and what the tokenizer and data fix."""
    if cfg.model.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {cfg.model.size!r}; valid: {list(MODEL_SIZES)}")
    # The tokenizer's config alone fixes its grid and codebook size: no network is built for them.
    tokenizer = tokenizer_config(cfg.tokenizer.kind, OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    return {
        **MODEL_SIZES[cfg.model.size],
        "widths": list(cfg.model.widths),
        "codebook_size": int(tokenizer.codebook_size),
        "grid": list(tokenizer.grid),
        "num_classes": cfg.data.num_classes,
    }


def fit_classifier_stage(cfg: DictConfig, poll_s: float = 5.0, timeout_s: float = 3600) -> Path:
    """Train the data's classifier (class accuracy and domain FID of samples) unless ``cfg.classifier.path`` exists."""
    path = Path(cfg.classifier.path)
    if path.is_file():
        log.info("classifier %s exists; skipping its training", path)
        return path
    if rank_zero_only.rank == 0:
        classifier = fit_classifier(
            build_datamodule(cfg.data),
            path,
            num_classes=cfg.data.num_classes,
            epochs=cfg.classifier.epochs,
            batch_size=cfg.classifier.batch_size,
            seed=cfg.seed,
        )
        log.info("classifier test accuracy %.4f, saved to %s", classifier.test_accuracy, path)
        return path
    deadline = time.monotonic() + timeout_s  # other processes wait for rank 0's (atomically written) file
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_zero_only.rank}: rank 0 wrote no classifier at {path}")
        time.sleep(poll_s)
    return path


def sampling_validation(cfg: DictConfig, tokenizer_ckpt: Path, classifier_path: Path) -> SamplingValidation:
    """The validation callback of ``cfg.sample_validation``, with the classifier's statistics of the real split.

    The classifier's features give FID for images and FVD-domain for clips;
    under frame prediction the conditioning clips are the reference split's
    token shard, in order.
    """
    options = cfg.sample_validation
    runnable = [name for name in options.schedules if set(load_schedule(name).widths) <= set(cfg.model.widths)]
    skipped = sorted(set(options.schedules) - set(runnable))
    if skipped:
        log.warning(
            "sample_validation: skipping schedules %s, which name widths outside model.widths=%s", skipped, cfg.model.widths
        )
    classifier = domain_classifier_features(classifier_path)
    real = build_datamodule(cfg.data)
    loader = torch.utils.data.DataLoader(real.dataset(options.reference_split), batch_size=options.batch_size)
    reference = feature_stats(loader, classifier, desc=f"reference {options.reference_split} ({classifier.name})")
    task = experiment_task(cfg)
    condition_shard = TokenDataset(shard_dir(cfg.tokenize.out_dir, options.reference_split)) if task.given_tokens else None
    return SamplingValidation(
        load_tokenizer(tokenizer_ckpt),
        classifier,
        reference,
        runnable,
        SamplingSettings.from_config(cfg.decode),
        task,
        condition_shard,
        cache=cfg.decode.cache,
        refresh_every=cfg.decode.refresh_every,
        samples=options.samples,
        batch_size=options.batch_size,
        every_n=options.every_n,
        width_grids=options.width_grids,
        seed=cfg.seed,
    )


def experiment_task(cfg: DictConfig) -> Task:
    """The experiment's :class:`Task` (``cfg.task``) for its tokenizer."""
    return build_task(cfg.task, cfg.tokenizer.kind, OmegaConf.to_container(cfg.tokenizer.model, resolve=True))


def fit_maskgit(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> dict[str, Any]:
    """Train the nested MaskGIT transformer on the token shards.

    Returns the trained ``module``, its ``checkpoint`` path and held-out ``metrics``.
    """
    run_dir = Path(cfg.run_dir)
    model_cfg = maskgit_model_config(cfg)
    max_steps = cfg.maskgit.trainer.max_steps
    module = NestedMaskGITModule(
        model=model_cfg,
        distill=cfg.distill.mode,
        alpha_decay_steps=max(1, round(cfg.distill.alpha_decay_fraction * max_steps)),
        seed=cfg.seed,
        task=experiment_task(cfg).as_dict(),
        **OmegaConf.to_container(cfg.maskgit.module, resolve=True),
    )
    datamodule = TokenDataModule(
        cfg.tokenize.out_dir,
        codebook_size=model_cfg["codebook_size"],
        grid=model_cfg["grid"],
        batch_size=cfg.maskgit.batch_size,
        num_workers=cfg.maskgit.num_workers,
        seed=cfg.seed,
    )
    callbacks: list[L.Callback] = [LearningRateMonitor(logging_interval="step"), *extra_callbacks]
    if cfg.maskgit.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=cfg.maskgit.ema_decay))
    trainer = stage_trainer(cfg, run_dir, cfg.maskgit.trainer, cfg.maskgit.checkpoint_every, callbacks)
    # resume=...; else this run directory's own checkpoint, when a requeued or rerun job starts here again.
    resume = resume_checkpoint(cfg) or own_resume_checkpoint(run_dir)
    if resume is not None:
        check_resume_compatible(resume, cfg)
        log.info("resuming from %s", resume)
    fit_stage(trainer, module, datamodule, resume)
    # The periodic last.ckpt may predate the final steps: save the end state explicitly.
    final = last_checkpoint(run_dir)
    save_checkpoint_atomically(trainer, final)
    (val_metrics,) = trainer.validate(module, datamodule=datamodule)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", {k: float(v) for k, v in val_metrics.items()})
        log.info("held-out masked-token metrics: %s", val_metrics)
    return {"module": module, "checkpoint": final, "metrics": val_metrics}


def resolve_device(device: str) -> str:
    """``auto``: cuda when a GPU is visible, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def tokenize(cfg: DictConfig) -> dict[str, Path]:
    """Token shards of the configured splits, with the configured (or the trained) tokenizer checkpoint."""
    return tokenize_splits(
        checkpoint=cfg.tokenize.checkpoint or tokenizer_final_checkpoint(cfg.tokenizer.dir),
        datamodule=build_datamodule(cfg.data),
        dataset_name=cfg.data.name,
        out_dir=cfg.tokenize.out_dir,
        splits=list(cfg.tokenize.splits),
        flip_splits=list(cfg.tokenize.flip_splits),
        batch_size=cfg.tokenize.batch_size,
        device=resolve_device(cfg.tokenize.device),
        num_workers=cfg.tokenize.num_workers,
    )


def check_pretokenized(cfg: DictConfig) -> None:
    """Fail fast, naming the path, when a pre-tokenized dataset's shards are not there."""
    shard_dirs = [shard_dir(cfg.tokenize.out_dir, split) for split in ("train", "val")]
    missing = [d for d in shard_dirs if not (d / "meta.json").is_file()]
    if missing:
        raise DataNotFoundError(
            f"experiment {cfg.name!r} trains on pre-tokenized {cfg.data.name} shards, but {', '.join(map(str, missing))} "
            "holds none (tokens.npy, labels.npy, meta.json). Write shards of that layout there "
            "(magnets.data.shards.write_shard), or point tokenize.out_dir=/path/to/shards at where they are."
        )


def tokenize_failed_marker(cfg: DictConfig) -> Path:
    """The file rank 0 leaves when tokenization fails, so that the processes waiting for its shards stop too."""
    return Path(cfg.tokenize.out_dir) / ".tokenize_failed"


def tokenize_once(cfg: DictConfig, tokenizer_ckpt: Path) -> dict[str, Path]:
    """Rank 0 writes the token shards; every other process polls for them.

    Polling rather than a collective barrier: tokenizing a large video split
    can outlast a process group's timeout. If rank 0 fails, it leaves
    :func:`tokenize_failed_marker` and the waiting processes raise as well.
    """
    marker = tokenize_failed_marker(cfg)
    if rank_zero_only.rank == 0:
        marker.unlink(missing_ok=True)
        try:
            return tokenize(cfg)
        except BaseException as err:
            atomic_write_text(marker, f"{type(err).__name__}: {err}\n")
            raise
    wait_for_shards(cfg, tokenizer_ckpt)
    return {split: shard_dir(cfg.tokenize.out_dir, split) for split in cfg.tokenize.splits}


def wait_for_shards(cfg: DictConfig, tokenizer_ckpt: Path, poll_s: float = 5.0, timeout_s: float = 24 * 3600) -> None:
    """Wait until rank 0 has written every configured split's shard with this tokenizer's tokens."""
    sha = file_sha256(tokenizer_ckpt)
    marker = tokenize_failed_marker(cfg)
    deadline = time.monotonic() + timeout_s
    for split in cfg.tokenize.splits:
        meta_path = shard_dir(cfg.tokenize.out_dir, split) / "meta.json"
        while not (meta_path.is_file() and json.loads(meta_path.read_text()).get("tokenizer_sha256") == sha):
            if marker.is_file():
                raise RuntimeError(f"rank {rank_zero_only.rank}: rank 0 failed to tokenize ({marker.read_text().strip()})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank_zero_only.rank}: no shard with tokenizer {sha[:12]} at {meta_path.parent}")
            time.sleep(poll_s)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment's ``stages`` in order; returns the outputs of each stage that ran.

    ``classifier`` runs only for ``sample_validation`` (it is the validation
    callback's feature network); the tokenizer and its shards are skipped for
    pre-tokenized data.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stages = list(cfg.stages)
    out: dict[str, Any] = {"tokenizer": None, "shards": {}}
    callbacks: list[L.Callback] = []
    if cfg.data.pretokenized:
        check_pretokenized(cfg)
    else:
        out["tokenizer"] = fit_tokenizer(cfg)
        if "tokenize" in stages:
            out["shards"] = tokenize_once(cfg, out["tokenizer"])
        if "classifier" in stages and cfg.sample_validation.enabled:
            callbacks.append(sampling_validation(cfg, out["tokenizer"], fit_classifier_stage(cfg)))
    if "maskgit" in stages:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        out["maskgit"] = fit_maskgit(cfg, callbacks)
    return out
