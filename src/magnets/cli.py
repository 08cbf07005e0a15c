"""What every entry point does around its work: check the whole config first, and turn user errors into one line.

``run_entry(task, cfg, check)`` runs ``check(cfg)`` before any model is
loaded or progress bar shown, then ``task(cfg)``; a
:class:`magnets.errors.UserError` from either (a bad config value, a missing
dataset, a mismatched checkpoint or shard) ends the process with
``error: <message>`` on stderr and exit status 2, not a traceback.

The ``check_*`` functions raise :class:`magnets.errors.ConfigError` naming
the key, the value and the valid values. This module imports no torch or
Lightning (the valid values are in :mod:`magnets.choices`), and the entry
points import their work only after the check, so a bad value is reported in
about a second; the few checks that need torch (CUDA present, a tokenizer's
or task's geometry, a resume checkpoint) import it when they run, after the
plain checks of the same config.
"""

from __future__ import annotations

import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from magnets.choices import (
    CACHE_MODES,
    DATAMODULES,
    DECODE_DTYPES,
    DISTILL_MODES,
    EXTRACTORS,
    FIXED_CLASS_COUNTS,
    GUIDANCE_RAMPS,
    LOGGERS,
    MASK_SCHEDULES,
    MODEL_DIMENSIONS,
    MODEL_SIZES,
    POLICY_CACHE_MODES,
    PRETRAINED_KINDS,
    REVEALS,
    ROUTES,
    SPLITS,
    STAGES,
    TOKENIZER_KINDS,
    TRAINER_PRECISIONS,
)
from magnets.decoding.schedules import load_schedule, shipped_schedules
from magnets.errors import ConfigError, MismatchError, UserError
from magnets.files import unwritable_reason

T = TypeVar("T")


def run_entry(task: Callable[[DictConfig], T], cfg: DictConfig, check: Callable[[DictConfig], None] | None = None) -> T:
    """``check(cfg)`` then ``task(cfg)``; a user error exits with status 2 and one line on stderr."""
    try:
        if check is not None:
            check(cfg)
        return task(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def check_choice(key: str, value: Any, valid: Iterable[Any]) -> None:
    valid = list(valid)
    if value not in valid:
        raise ConfigError(key, value, valid)


def check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "a positive integer")


def check_seed(key: str, value: Any) -> None:
    """A seed: a non-negative integer (what ``torch.manual_seed`` and ``lightning.seed_everything`` take)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "a non-negative integer, e.g. 0")


def check_writable(key: str, path: Any, is_dir: bool = False) -> None:
    """An output path that can be written (tried: see :func:`magnets.files.unwritable_reason`), before any work."""
    reason = unwritable_reason(str(path), is_dir=is_dir)
    if reason is not None:
        raise ConfigError(key, str(path), f"a writable {'folder' if is_dir else 'file path'} (here: {reason})")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (torch is imported here: only a config asking for a GPU pays for it)."""
    import torch

    return torch.cuda.is_available()


def check_accelerator(trainer: Mapping[str, Any], key: str = "trainer.accelerator") -> None:
    """A GPU accelerator only where CUDA is available (Lightning would raise deep inside ``Trainer``)."""
    accelerator = trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not cuda_available():
        raise ConfigError(key, accelerator, "cpu or auto: no CUDA device is available here (trainer=cpu)")


def check_unit_interval(key: str, value: Any, closed_right: bool = False) -> None:
    """A number in ``[0, 1)`` (``[0, 1]`` with ``closed_right``)."""
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not (0 <= value < 1 or (closed_right and value == 1)):
        raise ConfigError(key, value, f"a number in [0, 1{']' if closed_right else ')'}")


def check_maskgit_module(module: Mapping[str, Any], key: str = "maskgit.module") -> None:
    """The nested MaskGIT module's optimisation settings: positive learning rate, probabilities in range."""
    lr = module["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"{key}.lr", lr, "a positive number, e.g. 1.0e-3")
    check_unit_interval(f"{key}.label_smoothing", module["label_smoothing"])
    check_unit_interval(f"{key}.label_dropout", module["label_dropout"])
    check_unit_interval(f"{key}.weight_decay", module["weight_decay"])
    betas = list(module["betas"])
    if len(betas) != 2:
        raise ConfigError(f"{key}.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.96]")
    for beta in betas:
        check_unit_interval(f"{key}.betas", beta)
    if isinstance(module["warmup_steps"], bool) or not isinstance(module["warmup_steps"], int) or module["warmup_steps"] < 0:
        raise ConfigError(f"{key}.warmup_steps", module["warmup_steps"], "a non-negative integer")
    check_choice(f"{key}.mask_schedule", module["mask_schedule"], sorted(MASK_SCHEDULES))


def check_decode(decode: Mapping[str, Any], key: str = "decode") -> None:
    """The ``decode`` group: sampling settings, cache mode and refresh period, and the decode policies."""

    check_choice(f"{key}.cache", decode["cache"], CACHE_MODES + POLICY_CACHE_MODES)
    check_positive_int(f"{key}.refresh_every", decode["refresh_every"])
    check_choice(f"{key}.mask_schedule", decode["mask_schedule"], sorted(MASK_SCHEDULES))
    check_choice(f"{key}.guidance_ramp", decode["guidance_ramp"], GUIDANCE_RAMPS)
    for name in ("compile", "fast"):
        check_choice(f"{key}.{name}", decode[name], [True, False])
    for name, low, inclusive in (
        ("temperature", 0.0, False), ("temperature_anneal", 0.0, True),
        ("choice_temperature", 0.0, True), ("guidance_scale", 0.0, True),
    ):  # fmt: skip
        value = decode[name]
        if not isinstance(value, int | float) or value < low or (value == low and not inclusive):
            raise ConfigError(f"{key}.{name}", value, f"a number {'>=' if inclusive else '>'} {low:g}")
    check_choice(f"{key}.route", decode["route"], ROUTES)
    check_choice(f"{key}.route_reveal", decode["route_reveal"], REVEALS)
    check_positive_int(f"{key}.route_width", decode["route_width"])
    fraction = decode["route_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ConfigError(f"{key}.route_fraction", fraction, "a number in (0, 1]")
    for name in ("refresh_layer", "guidance_width", "guidance_steps"):
        value = decode[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}.{name}", value, "an integer >= 0 (0: off)")
    policy = decode["route"] != "none" or decode["cache"] in POLICY_CACHE_MODES
    if policy and (decode["fast"] or decode["compile"]):
        valid = "false with a decode policy (route or refresh_from_layer): they run eagerly"
        raise ConfigError(f"{key}.fast" if decode["fast"] else f"{key}.compile", True, valid)
    if decode["route"] != "none" and decode["cache"] in POLICY_CACHE_MODES:
        raise ConfigError(f"{key}.route", decode["route"], "none with cache refresh_from_layer (they do not combine)")


def check_schedule(schedule: Any, widths: Iterable[int] | None = None, key: str = "schedule") -> None:
    """A schedule name or mapping that loads, and (given ``widths``) names only widths the model has."""

    if isinstance(schedule, DictConfig):
        schedule = OmegaConf.to_container(schedule, resolve=True)
    try:
        loaded = load_schedule(schedule)
    except ValueError as err:
        raise ConfigError(key, schedule, f"one of {shipped_schedules()} or a mapping of name, widths, steps ({err})") from err
    if widths is not None:
        unknown = [p for p in loaded.widths if p not in list(widths)]
        if unknown:
            valid = f"widths of the model: {list(widths)}"
            if len(list(widths)) == 1:  # a single-width checkpoint (the distillation ablation's baselines)
                (width,) = widths
                valid += f" (one width: schedule={'maskgit_12' if width == 1 else f'm{width}_12'} decodes it)"
            raise ConfigError(f"{key}.widths", list(loaded.widths), valid)


def check_model(model: Mapping[str, Any], key: str = "model") -> None:

    check_choice(f"{key}.size", model["size"], list(MODEL_SIZES))
    for name in MODEL_DIMENSIONS:
        check_positive_int(f"{key}.{name}", model.get(name))
    dim = model["dim"]
    if dim % model["heads"]:
        raise ConfigError(f"{key}.heads", model["heads"], f"a divisor of {key}.dim={dim}")
    widths = list(model["widths"])
    # Any distinct divisors: [8, 4, 2, 1] nested; one width alone ([8]: m_8's slice) for the single-width baselines.
    if not widths or len(set(widths)) != len(widths) or any(not isinstance(p, int) or p < 1 or dim % p for p in widths):
        raise ConfigError(
            f"{key}.widths", widths, f"distinct positive divisors of dim={dim}, e.g. [8, 4, 2, 1] (nested) or [8] (m_8 alone)"
        )


def check_tokenizer(tokenizer: Mapping[str, Any], key: str = "tokenizer") -> None:

    check_choice(f"{key}.kind", tokenizer["kind"], sorted(TOKENIZER_KINDS))
    from magnets.models.tokenizer import tokenizer_config  # imports torch: after the plain checks

    try:
        tokenizer_config(tokenizer["kind"], tokenizer["model"])
    except ValueError as err:
        raise ConfigError(f"{key}.model", dict(tokenizer["model"]), f"a valid {tokenizer['kind']} config ({err})") from err
    weights = tokenizer.get("weights")
    if weights is not None and (tokenizer["kind"] not in PRETRAINED_KINDS or not Path(weights).is_file()):
        valid = f"an existing {tokenizer['kind']} weights file" if tokenizer["kind"] in PRETRAINED_KINDS else "null"
        raise ConfigError(f"{key}.weights", weights, f"{valid} (pretrained kinds: {sorted(PRETRAINED_KINDS)})")


def check_data(data: Mapping[str, Any], key: str = "data") -> None:

    if not data["pretokenized"]:
        target = (data.get("module") or {}).get("_target_")
        if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", target):
            valid = "the dotted path of a media datamodule class, e.g. " + ", ".join(".".join(p) for p in DATAMODULES.values())
            raise ConfigError(f"{key}.module._target_", target, valid)
    check_positive_int(f"{key}.num_classes", data["num_classes"])
    fixed = FIXED_CLASS_COUNTS.get(data["name"])
    if fixed is not None and data["num_classes"] != fixed:
        raise ConfigError(f"{key}.num_classes", data["num_classes"], f"{fixed}, the classes of {data['name']}")
    if data["name"] == "ucf101" and not data["pretokenized"]:
        check_ucf101_classes(data, key)


def check_ucf101_classes(data: Mapping[str, Any], key: str = "data") -> None:
    """``data.num_classes`` against UCF101's classInd.txt, when the folder is there (a missing one is reported by the
    data stage with how to get it)."""
    module = data["module"]
    split_dir = Path(module["split_dir"]) if module.get("split_dir") else Path(module["root"]) / "ucfTrainTestlist"
    class_index = split_dir / "classInd.txt"
    if not class_index.is_file():
        return
    classes = sum(1 for line in class_index.read_text().splitlines() if line.strip())
    if classes != data["num_classes"]:
        raise ConfigError(f"{key}.num_classes", data["num_classes"], f"{classes}, the classes listed in {class_index}")


def check_stages(stages: Iterable[str]) -> None:
    """``stages`` must be a prefix of :data:`STAGES` (``classifier`` may be left out: it serves sample validation only)."""
    stages = list(stages)
    allowed = [list(STAGES[:k]) for k in range(1, len(STAGES) + 1)] + [["tokenizer", "tokenize", "maskgit"]]
    if stages not in allowed:
        raise ConfigError("stages", stages, " or ".join(map(str, allowed)))


def check_task(cfg: DictConfig) -> None:
    """The ``task`` group fits the tokenizer (frame prediction needs clips and whole latent frames) and the model."""
    from magnets.task import build_task  # imports torch: after the plain checks

    task = build_task(
        cfg.task, cfg.tokenizer.kind, cast(dict[str, Any], OmegaConf.to_container(cfg.tokenizer.model, resolve=True))
    )
    if task.use_class and task.name == "frame_pred" and cfg.data.num_classes < 2:
        raise ConfigError("task.use_class", True, f"false: {cfg.data.name} has no classes to condition on")


def check_tokenizer_fits_data(cfg: DictConfig) -> None:
    """The tokenizer's input (size, frames, channels) is what the datamodule serves: found here, not mid-training."""
    pairs = (("image_size", "image_size"), ("frames", "frames"), ("in_channels", "channels"))
    for tokenizer_key, data_key in pairs:
        if tokenizer_key in cfg.tokenizer.model and data_key in cfg.data:
            value, wanted = cfg.tokenizer.model[tokenizer_key], cfg.data[data_key]
            if value != wanted:
                raise ConfigError(f"tokenizer.model.{tokenizer_key}", value, f"{wanted}, the data's {data_key} (data.{data_key})")


def check_tokenize(tokenize: Mapping[str, Any], key: str = "tokenize") -> None:
    """The ``tokenize`` section: splits, mirrored splits, batch size, device, workers, shard size, rank and world size."""
    for name in ("splits", "flip_splits"):
        for split in tokenize[name]:
            check_choice(f"{key}.{name}", split, SPLITS)
    extra = sorted(set(tokenize["flip_splits"]) - set(tokenize["splits"]))
    if extra:
        raise ConfigError(
            f"{key}.flip_splits", list(tokenize["flip_splits"]), f"a subset of {key}.splits={list(tokenize['splits'])}"
        )
    check_positive_int(f"{key}.batch_size", tokenize["batch_size"])
    check_device(tokenize["device"], key=f"{key}.device")
    workers = tokenize["num_workers"]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"{key}.num_workers", workers, "null (the datamodule's num_workers) or a non-negative integer")
    check_positive_int(f"{key}.items_per_shard", tokenize["items_per_shard"])
    rank, world_size = tokenize["rank"], tokenize["world_size"]
    if rank is None and world_size is None:
        return  # the launcher's (magnets.data.tokenization.process_rank)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"{key}.world_size", world_size, f"a positive integer, or null together with {key}.rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"{key}.rank", rank, f"an integer in [0, {key}.world_size={world_size}), or null with {key}.world_size")


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``python -m magnets.train`` reads, before any stage starts."""
    check_stages(cfg.stages)
    check_seed("seed", cfg.seed)
    check_seed("classifier.seed", cfg.classifier.seed)
    if "seed" in cfg.tokenizer:  # trained kinds; a pretrained tokenizer is not trained here
        check_seed("tokenizer.seed", cfg.tokenizer.seed)
    check_accelerator(cfg.trainer)
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.accelerator", "cpu", "gpu or auto: Lightning's FSDP runs on CUDA only (trainer=ddp on CPUs)")
    if cfg.data.pretokenized and cfg.sample_validation.enabled:
        raise ConfigError(
            "sample_validation.enabled", True, f"false: {cfg.data.name} is pre-tokenized, so there are no images to validate on"
        )
    if not cfg.data.pretokenized:
        check_tokenizer_fits_data(cfg)
        if "tokenize" in cfg.stages:
            check_tokenize(cfg.tokenize)

    check_data(cfg.data)
    check_model(cfg.model)
    check_choice("distill.mode", cfg.distill.mode, DISTILL_MODES)
    check_choice("logger.kind", cfg.logger.kind, LOGGERS)
    check_decode(cfg.decode)
    check_maskgit_module(cfg.maskgit.module)
    check_choice("trainer.precision", str(cfg.trainer.precision), TRAINER_PRECISIONS)
    check_positive_int("maskgit.batch_size", cfg.maskgit.batch_size)
    check_positive_int("maskgit.trainer.max_steps", cfg.maskgit.trainer.max_steps)
    check_choice("maskgit.module.compile", cfg.maskgit.module.compile, [True, False])
    if cfg.sample_validation.enabled:
        for name in cfg.sample_validation.schedules:
            check_schedule(name, key="sample_validation.schedules")
        check_choice("sample_validation.extractor.name", cfg.sample_validation.extractor.name, ["domain", *sorted(EXTRACTORS)])
        check_positive_int("sample_validation.reference_count", cfg.sample_validation.reference_count)
        npz = cfg.sample_validation.reference_npz
        if npz is not None and not Path(npz).is_file():
            raise ConfigError(
                "sample_validation.reference_npz", npz, "null or an existing .npz of reference statistics (mu, sigma)"
            )
        check_positive_int("sample_validation.samples", cfg.sample_validation.samples)
        check_positive_int("sample_validation.batch_size", cfg.sample_validation.batch_size)
    # The checks that import torch or Lightning, after every plain one.
    check_tokenizer(cfg.tokenizer)
    check_task(cfg)
    from magnets.runs import resume_checkpoint  # imports Lightning

    resume = resume_checkpoint(cfg)  # null, or a checkpoint that exists
    if resume is not None and not zipfile.is_zipfile(resume):  # torch.save writes a zip archive; a cut one has no index
        raise MismatchError(f"resume={cfg.resume!r}: {resume} is not a readable checkpoint (truncated or not a torch file)")


def check_decode_entry(cfg: DictConfig) -> None:
    """What ``sample`` and ``evaluate`` share: schedule, decode settings, batch size, device, seed, tokenizer override."""
    check_schedule(cfg.schedule)
    check_choice("allow_tokenizer_mismatch", cfg.allow_tokenizer_mismatch, [True, False])
    check_decode(cfg.decode)
    check_seed("seed", cfg.seed)
    check_positive_int("batch_size", cfg.batch_size)
    check_device(cfg.device)
    check_choice("dtype", cfg.dtype, list(DECODE_DTYPES))


def check_device(device: str, key: str = "device") -> None:
    """cpu, cuda or cuda:N (available here), or auto (cuda when available)."""
    if device == "auto":
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ConfigError(key, device, "auto, cpu, cuda or cuda:N")
    if str(device).startswith("cuda") and not cuda_available():
        raise ConfigError(key, device, "cpu or auto (no CUDA device is available here)")


def check_sample_config(cfg: DictConfig) -> None:
    check_decode_entry(cfg)
    check_positive_int("samples_per_class", cfg.samples_per_class)
    if cfg.out_dir:  # null: the checkpoint's own run folder, written by its training
        check_writable("out_dir", cfg.out_dir, is_dir=True)


def evaluation_seeds(cfg: DictConfig) -> list[int]:
    """The seeds to evaluate: ``seeds`` when given (``repeats``, if also set, must be its length), else ``repeats``
    consecutive seeds from ``seed``, else ``[seed]``."""
    seeds, repeats = cfg.seeds, cfg.repeats
    if repeats is not None:
        check_positive_int("repeats", repeats)
    if seeds is None:
        return [cfg.seed] if repeats is None else list(range(cfg.seed, cfg.seed + repeats))
    seeds = list(seeds) if isinstance(seeds, ListConfig | list | tuple) else seeds
    valid = "null or a non-empty list of distinct integers, e.g. [0, 1, 2]"
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError("seeds", seeds, valid)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", seeds, f"{valid} (a seed twice would count its samples twice)")
    if repeats is not None and repeats != len(seeds):
        raise ConfigError("repeats", repeats, f"null or {len(seeds)}, the number of seeds={seeds} (seeds wins when both are set)")
    return seeds


def check_evaluate_config(cfg: DictConfig) -> None:

    check_decode_entry(cfg)
    check_positive_int("samples", cfg.samples)
    if cfg.samples < 2:
        raise ConfigError("samples", cfg.samples, "at least 2 (FID/FVD need a covariance)")
    check_positive_int("reference.count", cfg.reference.count)
    check_choice("extractor.name", cfg.extractor.name, ["domain", *sorted(EXTRACTORS)])
    if cfg.extractor.name == "i3d_torchscript" and not cfg.extractor.path:
        raise ConfigError("extractor.path", None, "the I3D TorchScript file i3d_torchscript.pt (StyleGAN-V's FVD detector)")
    check_choice("reference.split", cfg.reference.split, SPLITS)
    check_positive_int("chunk_size", cfg.chunk_size)
    check_positive_int("is_splits", cfg.is_splits)
    check_choice("keep_samples", cfg.keep_samples, [True, False])
    if cfg.reference.npz is not None and not Path(cfg.reference.npz).is_file():
        valid = "null or an existing .npz of reference statistics (ADM's mu, sigma; or mean, cov, count)"
        raise ConfigError("reference.npz", cfg.reference.npz, valid)
    check_writable("results", cfg.results)
    if cfg.export_npz is not None:
        check_writable("export_npz", cfg.export_npz)


def check_policy_fits(decode: Mapping[str, Any], widths: Iterable[int], depth: int, key: str = "decode") -> None:
    """The decode policies against the loaded model: a routed width it has, a refresh layer in ``[0, depth]``."""
    widths = list(widths)
    if decode["route"] != "none" and decode["route_width"] not in widths:
        raise ConfigError(f"{key}.route_width", decode["route_width"], f"a width of the model: {widths}")
    if decode["cache"] in POLICY_CACHE_MODES and not 0 <= decode["refresh_layer"] <= depth:
        raise ConfigError(f"{key}.refresh_layer", decode["refresh_layer"], f"a layer in 0..{depth} (the model's depth)")
