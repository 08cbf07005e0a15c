"""The stages of an experiment: tokenizer, token shards of every split, classifier, nested MaskGIT.

``train(cfg)`` runs them in order (``python -m magnets.train``). Each stage
is skipped when its output exists and matches the config, and an output that
exists but was made under other settings is refused, naming each differing
field (:mod:`magnets.provenance`): the tokenizer when
``<tokenizer.dir>/tokenizer.ckpt`` exists and its saved config gives the same
:func:`~magnets.provenance.tokenizer_training_key` (an interrupted tokenizer
run resumes from the newer of ``checkpoints/last.ckpt`` and
``checkpoints/interrupted.ckpt``), a token shard when it holds this
tokenizer's tokens (else it is rewritten), the classifier (class accuracy and
FID of samples at validation, ``sample_validation``) when ``classifier.path``
exists with the same :func:`~magnets.provenance.classifier_training_key`. The
tokenizer and the classifier have their own seeds (``tokenizer.seed``,
``classifier.seed``): the runs of a seed sweep share them. The nested MaskGIT
stage writes to the run directory (``run_dir``) and records in each checkpoint
the tokenizer of the tokens it trains on and the identity of each token split;
``resume=last`` continues the newest run of the experiment from its last
checkpoint (step, optimizer, LR schedule, data order), refusing a checkpoint
trained on another tokenizer's tokens. Run-directory rules live in
:mod:`magnets.runs`.
"""

from __future__ import annotations

import io
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

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

from magnets.choices import LOGGERS, PRETRAINED_KINDS, model_dimensions
from magnets.data.base import build_datamodule
from magnets.data.shards import TokenDataModule, TokenDataset, read_meta, shard_dirs
from magnets.data.tokenization import (
    ShardWait,
    TokenizeFailedElsewhere,
    default_workers,
    local_device,
    process_rank,
    tokenize_splits,
)
from magnets.decoding.loop import SamplingSettings
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError, DataNotFoundError, MismatchError
from magnets.evaluation import media_key, reference_items, split_reference
from magnets.files import atomic_write, atomic_write_json, atomic_write_text, file_sha256
from magnets.lit.callbacks import ConfigInCheckpoint, ProvenanceInCheckpoint
from magnets.lit.maskgit import NestedMaskGITModule
from magnets.lit.sampling_validation import SamplingValidation
from magnets.lit.tokenizer import TokenizerModule, load_tokenizer
from magnets.metrics.classifier import fit_classifier, load_classifier
from magnets.metrics.extractors import (
    CLASSIFIER_EXTRACTORS,
    EXTRACTORS,
    domain_classifier_features,
    extractor_from_config,
)
from magnets.metrics.fid import FeatureExtractor
from magnets.metrics.reconstruction import reconstruction_fid, rfid_cache_path
from magnets.models.tokenizer import Tokenizer, load_pretrained_tokenizer, num_tokens, tokenizer_config
from magnets.provenance import check_same_key, classifier_training_key, short, split_identity, tokenizer_training_key
from magnets.runs import (
    INTERRUPTED_NAME,
    check_resume_compatible,
    checkpoint_dir,
    last_checkpoint,
    own_resume_checkpoint,
    resume_checkpoint,
    run_lock,
    save_checkpoint_atomically,
    shard_dir,
    tokenizer_final_checkpoint,
)
from magnets.task import Task, build_task

log = logging.getLogger(__name__)


def check_tokenizer_matches(checkpoint: Path, kind: str, model_cfg: dict[str, Any], cfg: DictConfig | None = None) -> None:
    """Refuse to reuse a tokenizer checkpoint trained with another kind or architecture, and (given the run's ``cfg``: a
    trained kind) one whose saved config gives another training key: other optimiser, codebook or trainer settings,
    seed, or data selection (a smoke run's short training). The file is read once."""
    record = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hparams = record.get("hyper_parameters", {})
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
    if cfg is None:
        return
    saved_config = record.get("config")
    remedy = (
        f"give the tokenizer a new tokenizer.name to train one for these settings, or delete {checkpoint.parent} "
        "to retrain it (its token shards are then rewritten)"
    )
    saved_key = None if saved_config is None else tokenizer_training_key(saved_config)
    check_same_key("tokenizer", checkpoint, saved_key, tokenizer_training_key(cfg), remedy)


def build_logger(kind: str, out_dir: Path) -> TensorBoardLogger | CSVLogger:
    """The ``logger`` group's logger, writing into ``out_dir/<kind>``."""
    if kind == "tensorboard":
        return TensorBoardLogger(out_dir, name="tensorboard", version="", default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(out_dir, name="csv", version="")
    raise ValueError(f"unknown logger {kind!r}; valid: {list(LOGGERS)}")


def stage_trainer(
    cfg: DictConfig, out_dir: Path, stage_args: DictConfig, checkpoint_every: int, callbacks: Sequence[L.Callback] = ()
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
            ConfigInCheckpoint(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))),
            TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate),
            *callbacks,
        ],
    )


# Exit status of a stage stopped by SIGTERM (128 + 15, as a shell reports a process the signal ended): a scheduler
# must not count a preempted job as finished.
PREEMPTED_EXIT_STATUS = 143
# Exit status of a stage stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_EXIT_STATUS = 130


def fit_stage(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: Path | None) -> None:
    """``trainer.fit``, turning a preemption (exit 143) or a Ctrl-C (exit 130) into a non-zero exit.

    On SIGTERM Lightning stops at the next batch, its ``OnExceptionCheckpoint``
    saves ``checkpoints/interrupted.ckpt`` (:func:`stage_trainer`) and it raises
    ``SIGTERMException``, a ``SystemExit`` of status 0. Here that becomes
    :data:`PREEMPTED_EXIT_STATUS`; started again in the same directory (a
    requeued job) or with ``resume=last``, the stage continues from that checkpoint.
    """
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as err:
        if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
            # Ctrl-C: Lightning saved interrupted.ckpt through OnExceptionCheckpoint, then exited with status 1.
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignored further Ctrl-C while shutting down
            log.error(
                "interrupted (Ctrl-C) at step %d; checkpoint in %s: rerun in this folder or with resume=last to continue",
                trainer.global_step, checkpoint_dir(trainer.default_root_dir),
            )  # fmt: skip
            raise SystemExit(INTERRUPTED_EXIT_STATUS) from None
        # A scheduler signals every process of the job: DataLoader workers may die of it before the loop stops.
        if not (isinstance(err, SIGTERMException) or trainer.received_sigterm):
            raise
        stage_dir = checkpoint_dir(trainer.default_root_dir)
        log.error("stopped by SIGTERM at step %d; checkpoint in %s (rerun to resume)", trainer.global_step, stage_dir)
        raise SystemExit(PREEMPTED_EXIT_STATUS) from None
    if not trainer.state.finished:
        raise RuntimeError(f"training stopped early ({trainer.state.status}); rerun with resume=last to continue")


def import_pretrained_tokenizer(cfg: DictConfig) -> Path:
    """The tokenizer checkpoint of a pretrained kind: ``tokenizer.weights`` (a public weights file) checked and wrapped once.

    The checkpoint has a trained tokenizer's layout (``hyper_parameters``:
    kind, model; ``state_dict``: ``model.*``), so tokenization, sampling and
    evaluation read it like any other; it also records the weights file and
    its sha256, and another weights file under the same ``tokenizer.dir`` is refused.
    """
    final = tokenizer_final_checkpoint(cfg.tokenizer.dir)
    kind, weights = cfg.tokenizer.kind, cfg.tokenizer.get("weights")
    model_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    if final.exists():
        check_tokenizer_matches(final, kind, model_cfg)
        saved = torch.load(final, map_location="cpu", weights_only=False)["hyper_parameters"].get("weights_sha256")
        if weights and saved != file_sha256(weights):
            raise MismatchError(
                f"{final} wraps another weights file than tokenizer.weights={weights}: "
                "give the tokenizer a new tokenizer.name, or delete that checkpoint"
            )
        log.info("tokenizer %s exists; using it", final)
        return final
    if not weights:
        raise ConfigError("tokenizer.weights", weights, f"the path of the {kind} weights file ({kind} is not trained here)")

    def write() -> None:
        model = load_pretrained_tokenizer(kind, model_cfg, weights)
        hparams = {"kind": kind, "model": model_cfg, "weights": str(weights), "weights_sha256": file_sha256(weights)}
        state_dict = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
        # Saved to memory first: a torch.save archive names its root after the file, so bytes (and sha256, which
        # token shards record) written straight to a temporary name would differ from one process or run to the next.
        archive = io.BytesIO()
        torch.save({"hyper_parameters": hparams, "state_dict": state_dict}, archive)
        atomic_write(final, lambda tmp: tmp.write_bytes(archive.getbuffer()))
        log.info("wrapped %s weights %s as %s", kind, weights, final)

    return written_by_rank_zero(final, write, "tokenizer checkpoint")


def fit_tokenizer(cfg: DictConfig) -> Path:
    """Train the tokenizer unless its final checkpoint exists; returns that checkpoint's path.

    Also evaluates it on the test split, measures its reconstruction FID
    (``tokenizer_eval``: :func:`tokenizer_rfid_metrics`) and writes ``metrics.json`` beside it.
    A pretrained kind (``PRETRAINED_KINDS``) is loaded from ``tokenizer.weights`` instead.
    """
    if cfg.tokenizer.kind in PRETRAINED_KINDS:
        return import_pretrained_tokenizer(cfg)
    tok_dir = Path(cfg.tokenizer.dir)
    final = tokenizer_final_checkpoint(tok_dir)
    model_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    if final.exists():
        check_tokenizer_matches(final, cfg.tokenizer.kind, model_cfg, cfg)
        log.info("tokenizer %s exists and was trained with these settings; skipping its training", final)
        return final

    L.seed_everything(cfg.tokenizer.seed, workers=True, verbose=False)  # its own seed: shared by a seed sweep

    datamodule = build_datamodule(cfg.data)
    # Find (or make) the data before a Trainer exists: a missing dataset is then one clear error, not a failure inside fit.
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Plain containers, so that checkpoints hold no OmegaConf objects.
    optim, codebook = (
        cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer[key], resolve=True)) for key in ("optim", "codebook")
    )
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
        check_tokenizer_matches(resume, cfg.tokenizer.kind, model_cfg, cfg)
    fit_stage(trainer, module, datamodule, resume)
    (test_metrics,) = trainer.test(module, datamodule=datamodule)

    save_checkpoint_atomically(trainer, final)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in test_metrics.items()}
        metrics["bits_per_pixel"] = token_bits_per_pixel(module.model.grid, module.model.codebook_size, datamodule.media_info())
        metrics.update(tokenizer_rfid_metrics(cfg, final, trainer.strategy.root_device))
        atomic_write_json(tok_dir / "metrics.json", metrics)
        log.info("tokenizer test metrics: %s", metrics)
    trainer.strategy.barrier()
    return final


def tokenizer_rfid_metrics(cfg: DictConfig, checkpoint: Path, device: torch.device) -> dict[str, Any]:
    """The reconstruction FID of the tokenizer at ``checkpoint`` (``tokenizer_eval``) as ``metrics.json`` entries.

    The first ``rfid_count`` items of ``rfid_split`` are encoded and decoded on
    ``device``; their features (``tokenizer_eval.extractor``) are compared with the real
    statistics that ``python -m magnets.evaluate`` uses for that split and
    count (cached in ``<paths.runs>/fid_stats``, as is the value). Empty when
    disabled, or when the extractor takes other media than the data (clips:
    an rFVD would need the video classifier, trained after the tokenizer).
    """
    options = cfg.tokenizer_eval
    if not options.enabled:
        return {}
    name, path = options.extractor.name, options.extractor.path
    if name not in EXTRACTORS:
        raise ConfigError("tokenizer_eval.extractor.name", name, sorted(EXTRACTORS))
    takes, data_kind = EXTRACTORS[name].media_kind, cfg.data.get("kind", "image")
    if takes != data_kind:
        log.info("tokenizer rFID skipped: tokenizer_eval.extractor.name=%s takes %ss, the data are %ss", name, takes, data_kind)
        return {}
    if (name in CLASSIFIER_EXTRACTORS or name == "i3d_torchscript") and path is None:
        valid = f"the file of {name} (the data's classifier is trained after the tokenizer), or an extractor needing none"
        raise ConfigError("tokenizer_eval.extractor.path", path, valid)
    extractor = extractor_from_config(name, path, None).to(device)
    data_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.data, resolve=True))
    split, count, batch_size = options.rfid_split, options.rfid_count, options.batch_size
    cache_dir = Path(cfg.paths.runs, "fid_stats")
    reference = split_reference(data_cfg, split, count, None, extractor, cache_dir, batch_size)
    split_key = f"{split}-{count}"
    cache_path = rfid_cache_path(
        cache_dir, file_sha256(checkpoint), extractor, media_key(data_cfg), split_key, f"{split}-{reference.count}"
    )
    tokenizer = load_tokenizer(checkpoint, device)
    items = reference_items(data_cfg, split, count, batch_size)
    value = reconstruction_fid(cast(Tokenizer, tokenizer), items, extractor, reference, cache_path=cache_path)
    return {"rfid": value, "rfid_extractor": name, "rfid_count": reference.count, "rfid_split": split}


def token_bits_per_pixel(grid: tuple[int, ...], codebook_size: int, media: dict[str, Any]) -> float:
    """Bits of the token grid per pixel position (per frame pixel for clips): ``prod(grid) log2(V) / (T H W)``."""
    height, width = media["resolution"]
    frames = media.get("frames", 1) if media["kind"] == "video" else 1
    return num_tokens(grid) * math.log2(codebook_size) / (frames * height * width)


def maskgit_model_config(cfg: DictConfig) -> dict[str, Any]:
    """Transformer config: the model group's dimensions and widths, and what the tokenizer and data fix."""
    # The tokenizer's config alone fixes its grid and codebook size: no network is built for them.
    tokenizer = tokenizer_config(
        cfg.tokenizer.kind, cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    )
    return {
        **model_dimensions(cfg.model),
        "widths": list(cfg.model.widths),
        "codebook_size": int(tokenizer.codebook_size),
        "grid": list(tokenizer.grid),
        "num_classes": cfg.data.num_classes,
    }


def written_by_rank_zero(path: Path, write: Callable[[], None], what: str, poll_s: float = 5.0, timeout_s: float = 3600) -> Path:
    """Rank 0 calls ``write()``, which leaves ``path`` (atomically); every other process waits for the file."""
    # mypy: Lightning sets rank_zero_only.rank at import time; its stubs do not declare the attribute.
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        write()
        return path
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_zero_only.rank}: rank 0 wrote no {what} at {path}")  # type: ignore[attr-defined]
        time.sleep(poll_s)
    return path


def fit_classifier_stage(cfg: DictConfig) -> Path:
    """Train the data's classifier (class accuracy and domain FID of samples) unless ``cfg.classifier.path`` exists
    with the same :func:`~magnets.provenance.classifier_training_key`; one made under other settings is refused."""
    path = Path(cfg.classifier.path)
    key = classifier_training_key(cfg)
    if path.is_file():
        remedy = f"point classifier.path at another file to train one for these settings, or delete {path} to retrain it"
        check_same_key("classifier", path, load_classifier(path).trained_with, key, remedy)
        log.info("classifier %s exists and was trained with these settings; skipping its training", path)
        return path

    def write() -> None:
        classifier = fit_classifier(
            build_datamodule(cfg.data),
            path,
            num_classes=cfg.data.num_classes,
            epochs=cfg.classifier.epochs,
            batch_size=cfg.classifier.batch_size,
            seed=cfg.classifier.seed,
            trained_with=key,
        )
        log.info("classifier test accuracy %.4f, saved to %s", classifier.test_accuracy, path)

    return written_by_rank_zero(path, write, "classifier")


def validation_extractor(cfg: DictConfig, classifier: FeatureExtractor | None) -> FeatureExtractor:
    """The features of ``sample_validation``'s FID/FVD (``sample_validation.extractor``, ``{name, path}``): the project's
    ``classifier`` for ``domain`` (FID-/FVD-domain), else a registered extractor (e.g. ``inception_offline``, the
    paper's FID)."""
    name, path = cfg.sample_validation.extractor.name, cfg.sample_validation.extractor.path
    if name == "domain":
        if classifier is None:
            raise ConfigError(
                "sample_validation.extractor.name", "domain", f"a registered extractor: no classifier was trained ({EXTRACTORS})"
            )
        return classifier
    return extractor_from_config(name, path, cfg.classifier.path)


def sampling_validation(cfg: DictConfig, tokenizer_ckpt: Path, classifier_path: Path | None) -> SamplingValidation:
    """The validation callback of ``cfg.sample_validation`` with the reference statistics of the real split.

    FID (images) or FVD (clips) in the features of ``sample_validation.extractor``:
    ``domain``, the project's classifier (FID-/FVD-domain), or e.g.
    ``inception_offline``; the real side is ``reference_npz`` (ADM's ``mu``,
    ``sigma``) or the first ``reference_count`` items of ``reference_split``,
    cached in ``<paths.runs>/fid_stats``. The classifier, when there is one,
    also gives the samples' class accuracy. Under frame prediction the
    conditioning clips are the reference split's token shard, in order.
    """
    options = cfg.sample_validation
    runnable = [name for name in options.schedules if set(load_schedule(name).widths) <= set(cfg.model.widths)]
    skipped = sorted(set(options.schedules) - set(runnable))
    if skipped:
        log.warning(
            "sample_validation: skipping schedules %s, which name widths outside model.widths=%s", skipped, cfg.model.widths
        )
    classifier = domain_classifier_features(classifier_path) if classifier_path is not None else None
    extractor = validation_extractor(cfg, classifier)
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        extractor.to("cuda")  # the real split's features: the Inception over 50,000 images wants the GPU
    reference = split_reference(
        cast(dict[str, Any], OmegaConf.to_container(cfg.data, resolve=True)), options.reference_split, options.reference_count,
        options.reference_npz, extractor, Path(cfg.paths.runs, "fid_stats"), options.batch_size,
    )  # fmt: skip
    task = experiment_task(cfg)
    condition_shard = TokenDataset(shard_dir(cfg.tokenize.out_dir, options.reference_split)) if task.given_tokens else None
    return SamplingValidation(
        load_tokenizer(tokenizer_ckpt),
        extractor,
        reference,
        runnable,
        SamplingSettings.from_config(cfg.decode),
        task,
        condition_shard,
        classifier=classifier,
        cache=cfg.decode.cache,
        refresh_every=cfg.decode.refresh_every,
        compile=cfg.decode.compile,
        fast=cfg.decode.fast,
        samples=options.samples,
        batch_size=options.batch_size,
        every_n=options.every_n,
        width_grids=options.width_grids,
        seed=cfg.seed,
    )


def experiment_task(cfg: DictConfig) -> Task:
    """The experiment's :class:`Task` (``cfg.task``) for its tokenizer."""
    return build_task(
        cfg.task, cfg.tokenizer.kind, cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    )


def token_provenance(cfg: DictConfig) -> dict[str, Any]:
    """What the nested MaskGIT trains on: the sha256 of the tokenizer whose tokens fill the shards, and each split's
    :func:`~magnets.provenance.split_identity`.

    Refuses train and val shards of two tokenizers, and (for data the experiment tokenizes itself) shards of another
    tokenizer than the experiment's: left by an earlier tokenizer under the same name, they would train the transformer
    on codes the tokenizer now decodes into other pictures.
    """
    tokenizers: dict[str, str] = {}
    splits: dict[str, str] = {}
    for split in ("train", "val"):
        split_dir = shard_dir(cfg.tokenize.out_dir, split)
        tokenizers[split] = read_meta(split_dir).tokenizer_sha256
        splits[split] = split_identity(split_dir)
    if tokenizers["train"] != tokenizers["val"]:
        raise MismatchError(
            f"the train and val token shards in {cfg.tokenize.out_dir} hold tokens of two tokenizers (sha256 "
            f"{short(tokenizers['train'])} and {short(tokenizers['val'])}): rerun the tokenize stage to rewrite them"
        )
    if not cfg.data.pretokenized:
        tokenizer = Path(cfg.tokenize.checkpoint or tokenizer_final_checkpoint(cfg.tokenizer.dir))
        expected = file_sha256(tokenizer)
        if tokenizers["train"] != expected:
            raise MismatchError(
                f"the token shards in {cfg.tokenize.out_dir} hold tokens of tokenizer sha256 {short(tokenizers['train'])}, "
                f"not of {tokenizer} (sha256 {short(expected)}): run the tokenize stage (stages=[..., tokenize, ...]) "
                "to rewrite them"
            )
    return {"tokenizer_sha256": tokenizers["train"], "token_splits": splits}


def fit_maskgit(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
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
        **cast(dict[str, Any], OmegaConf.to_container(cfg.maskgit.module, resolve=True)),
    )
    datamodule = TokenDataModule(
        cfg.tokenize.out_dir,
        codebook_size=model_cfg["codebook_size"],
        grid=model_cfg["grid"],
        batch_size=cfg.maskgit.batch_size,
        num_workers=cfg.maskgit.num_workers,
        seed=cfg.seed,
        num_classes=model_cfg["num_classes"] or None,  # labels index the class embedding: checked when a split opens
    )
    provenance = token_provenance(cfg)
    callbacks: list[L.Callback] = [
        LearningRateMonitor(logging_interval="step"),
        ProvenanceInCheckpoint(provenance),
        *extra_callbacks,
    ]
    if cfg.maskgit.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=cfg.maskgit.ema_decay))
    trainer = stage_trainer(cfg, run_dir, cfg.maskgit.trainer, cfg.maskgit.checkpoint_every, callbacks)
    # resume=...; else this run directory's own checkpoint, when a requeued or rerun job starts here again.
    resume = resume_checkpoint(cfg) or own_resume_checkpoint(run_dir)
    if resume is not None:
        check_resume_compatible(resume, cfg, provenance)
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


def tokenize(cfg: DictConfig, tokenizer_ckpt: Path | None = None, wait: ShardWait | None = None) -> dict[str, Path]:
    """This process's share of the configured splits' token shards (all of them when it is alone); split -> folder.

    The tokenizer is ``tokenize.checkpoint``, else ``tokenizer_ckpt`` (the
    tokenizer stage's), else ``<tokenizer.dir>/tokenizer.ckpt``. Shard ``i``
    is written by rank ``i % world_size`` (``tokenize.rank`` and
    ``tokenize.world_size``, or the launcher's: :func:`process_rank`);
    finished shards are skipped. With ``wait`` it returns once every shard of
    every split exists, the other processes' included.
    """
    rank, world_size = process_rank(cfg.tokenize.rank, cfg.tokenize.world_size)
    workers = cfg.tokenize.num_workers
    if workers is None:
        workers = default_workers(OmegaConf.select(cfg, "data.module.num_workers", default=0) or 0)
    return tokenize_splits(
        checkpoint=cfg.tokenize.checkpoint or tokenizer_ckpt or tokenizer_final_checkpoint(cfg.tokenizer.dir),
        datamodule=build_datamodule(cfg.data),
        dataset_name=cfg.data.name,
        out_dir=cfg.tokenize.out_dir,
        splits=list(cfg.tokenize.splits),
        flip_splits=list(cfg.tokenize.flip_splits),
        batch_size=cfg.tokenize.batch_size,
        device=local_device(resolve_device(cfg.tokenize.device)),
        num_workers=workers,
        items_per_shard=cfg.tokenize.items_per_shard,
        rank=rank,
        world_size=world_size,
        wait=wait,
    )


def tokenize_command(cfg: DictConfig) -> dict[str, Path]:
    """``python -m magnets.tokenize``: this process's shards; a pretrained tokenizer's weights are wrapped first.

    The wrapped checkpoint's bytes depend only on the weights and the config,
    so processes on several machines that each wrap them (``tokenize.rank=R
    tokenize.world_size=W``) record the same tokenizer in their shards.
    """
    pretrained = cfg.tokenizer.kind in PRETRAINED_KINDS and not cfg.tokenize.checkpoint
    return tokenize(cfg, tokenizer_ckpt=import_pretrained_tokenizer(cfg) if pretrained else None)


def check_pretokenized(cfg: DictConfig) -> None:
    """Fail fast, naming the path, when a pre-tokenized dataset's train or val shards are not there or not all there."""
    split_dirs = [shard_dir(cfg.tokenize.out_dir, split) for split in ("train", "val")]
    missing = [d for d in split_dirs if not (d / "meta.json").is_file() and not shard_dirs(d)]
    if missing:
        raise DataNotFoundError(
            f"experiment {cfg.name!r} trains on pre-tokenized {cfg.data.name} shards, but {', '.join(map(str, missing))} "
            "holds none (shard-NNNNN/ folders of tokens.npy, labels.npy, meta.json, or those three files directly). "
            "Write shards of that layout there (magnets.data.shards.write_shard), or point tokenize.out_dir=/path/to/shards "
            "at where they are."
        )
    for split_dir in split_dirs:
        read_meta(split_dir)  # refuses a split with shards missing ("k of n shards present") or of mixed runs


def tokenize_failed_marker(cfg: DictConfig) -> Path:
    """The file a process leaves when its tokenization fails, so that the processes waiting for its shards stop too."""
    return Path(cfg.tokenize.out_dir) / ".tokenize_failed"


def tokenize_once(cfg: DictConfig, tokenizer_ckpt: Path) -> dict[str, Path]:
    """Every process writes its own share of the shards (:func:`tokenize`), then waits until every split is complete.

    Under DDP each rank tokenizes shards ``rank, rank + world_size, ...``, so
    the ranks share the decoding and encoding. Polling the shard folders
    rather than a collective barrier: tokenizing a large split can outlast a
    process group's timeout. A process that fails leaves
    :func:`tokenize_failed_marker` (rank 0 clears it when it starts) and the
    waiting processes raise as well.
    """
    marker = tokenize_failed_marker(cfg)
    rank, _ = process_rank(cfg.tokenize.rank, cfg.tokenize.world_size)
    if rank == 0:
        marker.unlink(missing_ok=True)
    try:
        return tokenize(cfg, tokenizer_ckpt, wait=ShardWait(marker))
    except TokenizeFailedElsewhere:
        raise
    except BaseException as err:
        atomic_write_text(marker, f"rank {rank}: {type(err).__name__}: {err}\n")
        raise


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
        # The classifier gives class accuracy and the features of extractor=domain; stages without it validate with
        # another extractor only.
        with_classifier = "classifier" in stages and cfg.sample_validation.enabled
        classifier = fit_classifier_stage(cfg) if with_classifier else None
        validates = "maskgit" in stages and cfg.sample_validation.enabled
        if validates and (with_classifier or cfg.sample_validation.extractor.name != "domain"):
            callbacks.append(sampling_validation(cfg, out["tokenizer"], classifier))
    if "maskgit" in stages:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        with run_lock(Path(cfg.run_dir)):  # the stage that writes the run's folder: a second process there stops
            out["maskgit"] = fit_maskgit(cfg, callbacks)
    return out
