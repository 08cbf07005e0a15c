"""The values a config key may take, in one module that imports no torch or Lightning.

The whole-config checks (:mod:`magnets.cli`) read these before any heavy
module loads, so a bad value is reported in about a second; the modules that
act on a choice import it from here (datamodules, tokenizer kinds, cache
modes, ...). Where a registry maps a name to a function or class (mask
schedules, extractors, decode dtypes), its module keeps the registry and
:mod:`tests.test_configs` checks that its names are the ones listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

SPLITS = ("train", "val", "test")

DATAMODULES: dict[str, tuple[str, str]] = {
    "fmnist": ("magnets.data.images", "FashionMNISTDataModule"),
    "imagenet": ("magnets.data.imagenet", "ImageNetDataModule"),
    "ucf101": ("magnets.data.video", "UCF101DataModule"),
    "kinetics600": ("magnets.data.video", "Kinetics600DataModule"),
    "moving_fmnist": ("magnets.data.moving_fmnist", "MovingFMNISTDataModule"),
}
"""``data.name`` -> (module, class) of its datamodule, imported when built (:func:`magnets.data.base.build_datamodule`)."""

FIXED_CLASS_COUNTS: dict[str, int] = {"fmnist": 10, "moving_fmnist": 10}
"""Datasets whose class count is fixed (checked against ``data.num_classes`` before any stage); the others are counted
from their files (UCF101's classInd.txt, ImageNet's class folders)."""

TOKENIZER_KINDS: dict[str, tuple[str, str, str]] = {
    "vq2d": ("magnets.models.vq", "VQConfig", "VQTokenizer"),
    "causal3d": ("magnets.models.video_tokenizer", "CausalTokenizerConfig", "CausalVideoTokenizer"),
    "maskgit_vqgan": ("magnets.models.maskgit_vqgan", "MaskGITVQGANConfig", "MaskGITVQGAN"),
}
"""``tokenizer.kind`` -> (module, config dataclass, model class), imported when built (:mod:`magnets.models.tokenizer`)."""

PRETRAINED_KINDS: dict[str, tuple[str, str]] = {
    "maskgit_vqgan": ("magnets.models.maskgit_vqgan", "load_maskgit_vqgan_weights"),
}
"""Tokenizer kinds loaded from a public weights file (``tokenizer.weights``) instead of trained: kind -> (module,
loader)."""

MASK_SCHEDULES = ("cosine", "linear", "square_root", "arccos")
"""``mask_schedule`` of training and decoding (the formulas: :data:`magnets.masking.MASK_SCHEDULES`)."""

CACHE_MODES = ("none", "refresh_on_switch", "no_refresh", "refresh_every_n")
"""``decode.cache`` modes a static decode plan covers (:mod:`magnets.decoding.plan`)."""
POLICY_CACHE_MODES = ("refresh_from_layer",)
"""Cache modes only the eager policy callable runs (:mod:`magnets.decoding.policies`): a switch there is a "partial"
step."""

GUIDANCE_RAMPS = ("constant", "linear")
"""``decode.guidance_ramp``: classifier-free guidance constant over the steps, or rising linearly."""

ROUTES = ("none", "confidence", "context")
"""``decode.route``: token routing of a decode policy (:mod:`magnets.decoding.policies`)."""
REVEALS = ("any", "wide")
"""``decode.route_reveal``: which masked tokens a routed step may reveal: any of them, or only the ones it ran wide."""

DECODE_DTYPES = ("float32", "bfloat16", "float16")
"""``dtype`` of sample, evaluate and bench: the transformer's weights while decoding (bfloat16 is the GPU setting)."""

DISTILL_MODES = ("progressive", "none")
"""``distill.mode``: each width learns from the next wider one's predictions, or all from the ground truth only."""

EXTRACTORS = ("inception_offline", "inception_fidelity", "fmnist_classifier", "video_classifier", "i3d_torchscript")
"""Registered FID/FVD feature extractors (``extractor.name``; the classes: :data:`magnets.metrics.extractors.EXTRACTORS`);
``domain`` is the run's own classifier."""

LOGGERS = ("tensorboard", "csv")
"""``logger.kind``."""

TRAINER_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")
"""Lightning's ``Trainer(precision=...)`` values (``16``/``bf16`` aliases are deprecated there)."""

STAGES = ("tokenizer", "tokenize", "classifier", "maskgit")
"""The stages of ``make train``, in order (``stages``)."""

BENCHES = ("decode", "train")
"""``bench`` of ``python -m magnets.bench``."""
DECODE_PATHS = ("eager", "fast")
"""``decode_bench.paths``: the eager decode, or the planned one (``decode.fast``)."""
"""The stages of ``make train``, in order (``stages``)."""

MODEL_DIMENSIONS = ("dim", "depth", "heads", "mlp_dim")
"""What a model size fixes; each ``conf/model/<size>.yaml`` holds them, beside its ``size`` name and ``widths``."""
MODEL_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
"""The model group of the project's Hydra configs (where the entry points' ``config_path`` points too)."""


def model_dimensions(model: Mapping[str, Any]) -> dict[str, int]:
    """The :data:`MODEL_DIMENSIONS` of a model config (a ``conf/model`` group or a mapping with those keys)."""
    return {key: int(model[key]) for key in MODEL_DIMENSIONS}


def load_model_sizes(folder: Path = MODEL_CONF_DIR) -> dict[str, dict[str, int]]:
    """Every ``<folder>/*.yaml`` model size by its ``size`` name, smallest first: its :data:`MODEL_DIMENSIONS`.
    The YAML files are the one home of the numbers; code that names a size (the benchmark's ``flops_model``, the
    GPU check) reads them here."""
    sizes = {}
    for path in folder.glob("*.yaml"):
        fields = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(fields, dict) or "size" not in fields or any(k not in fields for k in MODEL_DIMENSIONS):
            raise ValueError(f"{path}: a model size needs size and {', '.join(MODEL_DIMENSIONS)}")
        sizes[str(fields["size"])] = model_dimensions(cast(Mapping[str, Any], fields))
    return dict(sorted(sizes.items(), key=lambda item: (item[1]["dim"], item[1]["depth"])))


MODEL_SIZES: dict[str, dict[str, int]] = load_model_sizes()
"""``conf/model/*.yaml`` by size name: tiny, fmnist, fmnist_paper, s, b, l, xl."""
