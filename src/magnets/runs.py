"""Run-directory rules, in one home: stage paths, the newest checkpoint, resuming, saving the final state.

Layout (docs/design.md): ``<paths.runs>/<experiment>/<time>/{checkpoints,tensorboard,samples,metrics.json}``
for the nested MaskGIT stage, ``<tokenizer.dir>/{tokenizer.ckpt,checkpoints,tensorboard,metrics.json}``
for the tokenizer, and token shards in ``<tokenize.out_dir>/<split>``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from magnets.errors import ConfigError, MismatchError, UserError
from magnets.lit.checkpoints import read_checkpoint
from magnets.provenance import short

log = logging.getLogger(__name__)

# Checkpoints a stage leaves in checkpoint_dir(): the periodic/final one, and the one written when a run crashes
# or is interrupted (Lightning's OnExceptionCheckpoint adds the suffix to INTERRUPTED_NAME).
INTERRUPTED_NAME = "interrupted"
RESUMABLE_CHECKPOINTS = ("last.ckpt", f"{INTERRUPTED_NAME}.ckpt")
# Config entries a resumed run must share with the run that wrote its checkpoint.
RESUME_MUST_MATCH = ("model", "distill", "tokenizer.kind", "tokenizer.model", "data.name", "tokenize.out_dir", "seed")


RESUME_PATH_KEYS = ("tokenize.out_dir",)
"""Settings of :data:`RESUME_MUST_MATCH` that are paths: the same folder given relative or absolute is the same."""


def same_setting(key: str, saved: Any, current: Any) -> bool:
    """Whether a checkpoint's saved ``key`` equals the current one (paths compared as absolute paths)."""
    if key in RESUME_PATH_KEYS and saved is not None and current is not None:
        return os.path.abspath(str(saved)) == os.path.abspath(str(current))
    return bool(saved == current)


def tokenizer_final_checkpoint(tokenizer_dir: str | Path) -> Path:
    """Where the tokenizer stage saves its trained tokenizer."""
    return Path(tokenizer_dir) / "tokenizer.ckpt"


def checkpoint_dir(stage_dir: str | Path) -> Path:
    """Where a stage's Trainer writes ``last.ckpt`` (and ``interrupted.ckpt`` after a crash)."""
    return Path(stage_dir) / "checkpoints"


def last_checkpoint(stage_dir: str | Path) -> Path:
    return checkpoint_dir(stage_dir) / RESUMABLE_CHECKPOINTS[0]


def shard_dir(out_dir: str | Path, split: str) -> Path:
    """Where the token shard of ``split`` lives."""
    return Path(out_dir) / split


def newest_checkpoint(root: str | Path, pattern: str = "checkpoints") -> Path | None:
    """The most recently written ``last.ckpt`` or ``interrupted.ckpt`` under ``root/pattern``, if any."""
    candidates = [p for name in RESUMABLE_CHECKPOINTS for p in Path(root).glob(f"{pattern}/{name}")]  # pattern: checkpoint_dir
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


# Lightning's SLURM auto-requeue saves this in the Trainer's default_root_dir when the requeue signal arrives.
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def own_resume_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest checkpoint a stage left in its own directory: ``last``, ``interrupted`` or a SLURM ``hpc_ckpt_N``.

    A stage started again in the same directory (a scheduler's requeue, a
    rerun of a preempted job) continues from it.
    """
    candidates = [p for p in (newest_checkpoint(stage_dir), *Path(stage_dir).glob(HPC_CHECKPOINT_GLOB)) if p is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def is_complete_archive(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (a zip file with its index): a cut one has none."""
    return zipfile.is_zipfile(path)


def run_is_written_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds ``<run_dir>/.lock`` (:func:`run_lock`): that run is still being written."""
    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def resolve_checkpoint(
    checkpoint: str, runs: str | Path, name: str, key: str = "checkpoint", own_run_dir: str | Path | None = None
) -> Path:
    """``last``: the newest complete checkpoint of experiment ``name`` under ``runs``; anything else must be a checkpoint file.

    With ``last``, a checkpoint cut short (not a whole archive) is passed over, and for ``resume`` (``key="resume"``)
    so is a run another process is still writing (its folder's lock held; ``own_run_dir``, the resuming run's own
    folder, excepted): each with a log line.
    """
    if checkpoint == "last":
        root = Path(runs, name)
        candidates = [p for file in RESUMABLE_CHECKPOINTS for p in root.glob(f"*/checkpoints/{file}")]
        own = Path(own_run_dir).resolve() if own_run_dir is not None else None
        passed_over = []
        for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
            run_dir = candidate.parent.parent
            if not is_complete_archive(candidate):
                passed_over.append(f"{candidate} (not a whole checkpoint: cut short?)")
            elif key == "resume" and run_dir.resolve() != own and run_is_written_elsewhere(run_dir):
                passed_over.append(f"{candidate} (another process is still writing that run)")
            else:
                for reason in passed_over:
                    log.warning("%s=last: passing over %s", key, reason)
                return candidate
        found = f"; passed over: {', '.join(passed_over)}" if passed_over else ""
        raise ConfigError(
            key, checkpoint, f"a checkpoint path, or 'last' once {root}/*/checkpoints/last.ckpt exists as a whole "
            f"checkpoint of a finished or stopped run (train first: make train EXP={name}){found}"
        )  # fmt: skip
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(key, checkpoint, "'last' or the path of an existing checkpoint file")
    return path


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint ``cfg.resume`` names: null, ``last`` (the newest complete one of this experiment, not of a run that
    another process is writing) or a path."""
    if cfg.resume is None:
        return None
    own_run_dir = OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False)  # outside a Hydra app: unknown
    return resolve_checkpoint(str(cfg.resume), cfg.paths.runs, cfg.name, key="resume", own_run_dir=own_run_dir)


def check_resume_compatible(checkpoint: Path, cfg: DictConfig, provenance: dict[str, Any] | None = None) -> None:
    """Refuse to resume from a checkpoint written under another model, distillation, tokenizer or data, and (given the
    current token ``provenance``: :func:`magnets.pipeline.token_provenance`) one trained on another tokenizer's tokens
    than the shards hold now, e.g. after the tokenizer was retrained under its name. The file is read once."""
    record = read_checkpoint(checkpoint, "MaskGIT")  # a damaged file: one line
    if provenance is not None:
        check_resume_tokens(checkpoint, record.get("provenance"), provenance, cfg.tokenize.out_dir)
    saved = OmegaConf.create(record.get("config", {}))
    current = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    diffs = [
        key for key in RESUME_MUST_MATCH if not same_setting(key, OmegaConf.select(saved, key), OmegaConf.select(current, key))
    ]
    if diffs:
        details = "; ".join(f"{k}: checkpoint {OmegaConf.select(saved, k)}, now {OmegaConf.select(current, k)}" for k in diffs)
        raise MismatchError(f"cannot resume from {checkpoint}: it was trained with other settings ({details})")


def check_resume_tokens(checkpoint: Path, saved: dict[str, Any] | None, provenance: dict[str, Any], out_dir: str | Path) -> None:
    """Refuse a ``checkpoint`` whose recorded provenance ``saved`` names another tokenizer than the shards in ``out_dir``
    hold now (``provenance``)."""
    if saved is None:
        log.warning("%s records no tokenizer (written before checkpoints did): its tokens cannot be checked", checkpoint)
        return
    if saved["tokenizer_sha256"] != provenance["tokenizer_sha256"]:
        raise MismatchError(
            f"cannot resume from {checkpoint}: it was trained on tokens of tokenizer sha256 {short(saved['tokenizer_sha256'])}, "
            f"the shards in {out_dir} hold tokens of {short(provenance['tokenizer_sha256'])} (was the tokenizer retrained?): "
            "start a new run without resume=, or point tokenize.out_dir at the shards it trained on"
        )


def tokenizer_of_run(run_config: dict[str, Any], checkpoint: Path, runs: str | Path) -> Path:
    """The tokenizer checkpoint a MaskGIT run trained on, from the config saved in its checkpoint.

    A relative path under the run's ``paths.runs`` is taken under ``runs``
    instead, so that a runs folder can be moved or read from another directory.
    """
    try:
        explicit = run_config["tokenize"]["checkpoint"]
        path = Path(explicit) if explicit else tokenizer_final_checkpoint(run_config["tokenizer"]["dir"])
        saved_runs = Path(run_config["paths"]["runs"])
    except (KeyError, TypeError) as err:
        raise MismatchError(
            f"{checkpoint} holds no run config naming its tokenizer (tokenize.checkpoint, tokenizer.dir): "
            "give tokenizer_checkpoint=PATH"
        ) from err
    if not path.is_absolute() and path.is_relative_to(saved_runs):
        return Path(runs, path.relative_to(saved_runs))
    return path


def check_tokenizer_fits_model(
    codebook_size: int, grid: Iterable[int], tokenizer_path: Path, model_cfg: Any, checkpoint: Path
) -> None:
    """Refuse a tokenizer (``codebook_size`` codes, token ``grid``) that cannot be the one ``checkpoint``'s transformer
    (``model_cfg``) was trained on: another codebook size or grid would index past the embedding, or decode its token
    ids into other codes' pictures without a word."""
    grid, model_grid = list(grid), list(model_cfg.grid)
    if codebook_size != model_cfg.codebook_size or grid != model_grid:
        raise MismatchError(
            f"tokenizer {tokenizer_path} ({codebook_size} codes, grid {grid}) does not fit the transformer {checkpoint} "
            f"({model_cfg.codebook_size} codes, grid {model_grid}): give the tokenizer it was trained with "
            "(tokenizer_checkpoint=null takes the one its saved config names)"
        )


def global_rank_from_env() -> int:
    """This process's rank in a multi-process run, from the launcher's environment (torchrun's ``RANK``, SLURM's
    ``SLURM_PROCID``, Lightning's ``LOCAL_RANK`` for the processes it starts); 0 for a single process."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` while a run writes there, so that a second run given the same folder stops at once
    with one line naming the holder instead of mixing checkpoints and logs. Only rank 0 of a multi-process run takes
    it (every rank writes in one folder); the operating system releases it when the process ends, however it ends."""
    if global_rank_from_env() != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"run folder {run_dir} is being written by {holder}: give this run its own folder (run_dir= or "
            "hydra.run.dir=), or wait for that run to end"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def save_checkpoint_atomically(trainer: L.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary name, then renamed: ``path`` appears only when complete, and a save
    that fails (a full disk, a kill signal's exception) leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    trainer.strategy.barrier()
