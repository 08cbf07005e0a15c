"""Small domain classifiers of images or clips: the fast feature networks for FID / FVD and class accuracy on CPU.

:func:`fit_classifier` trains one on a media datamodule's train split, so it
sees items exactly as the generative model does (float ``[0, 1]``, the
datamodule's channels and size):

- images ``[C, H, W]``: a timm model, by default a ``resnet10t`` slimmed to
  32-256 channels (1.2M parameters);
- clips ``[C, T, H, W]``: the project's :class:`VideoCNN3d` (arch
  ``video_cnn3d``), four Conv3d + BatchNorm + ReLU stages of 32-256 channels
  (1.2M parameters).

Its penultimate layer (global-pooled features) feeds FID / FVD-domain; its
logits give the class accuracy of generated samples.

A checkpoint is one ``torch.save`` file holding the state dict, the
architecture (name and keyword arguments), the input size, channel count and
(clips) frame count, and the test accuracy; it is written atomically and
checked on load. Checkpoints written before clips were supported have no
``frames`` and load as image classifiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from magnets.data.base import MediaDataModule, to_unit_float
from magnets.errors import ConfigError, MismatchError, load_error_summary
from magnets.files import atomic_write

CHECKPOINT_FORMAT = "magnets.classifier.v1"
DEFAULT_ARCH = "resnet10t"
# 32-256 channels instead of 64-512: 1.2M parameters, ~40 s per Fashion-MNIST epoch on one CPU thread.
DEFAULT_ARCH_KWARGS: dict[str, Any] = {"channels": [32, 64, 128, 256], "stem_width": 16}
DEFAULT_VIDEO_ARCH = "video_cnn3d"
DEFAULT_VIDEO_ARCH_KWARGS: dict[str, Any] = {"channels": [32, 64, 128, 256]}
_REQUIRED_KEYS = ("format", "arch", "arch_kwargs", "image_size", "in_chans", "num_classes", "test_accuracy", "state_dict")


class ClassifierCheckpointError(MismatchError):
    """A classifier checkpoint is missing, unreadable, or does not match its architecture."""


@dataclass
class Classifier:
    """A trained classifier and what its checkpoint says about it."""

    model: nn.Module
    arch: str
    image_size: int
    in_chans: int
    num_classes: int
    test_accuracy: float
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    frames: int | None = None  # clips [C, frames, H, W]; None: images
    trained_with: dict[str, Any] | None = None  # what produced it (magnets.provenance.classifier_training_key); None: unrecorded

    @property
    def media_kind(self) -> str:
        return "image" if self.frames is None else "video"


class VideoCNN3d(nn.Module):
    """Clips float ``[B, C, T, H, W]`` -> class scores: Conv3d + BatchNorm + ReLU stages, global average pool, linear head.

    The first stage halves space only (motion between neighbouring frames is
    the signal), the others halve time and space; on a 17x32x32 clip the
    stages see 17x16x16, 9x8x8, 5x4x4 and 3x2x2. It has timm's classifier
    interface (``num_features``, ``forward_features``, ``forward_head``), so
    feature extraction treats it like the image classifiers.
    """

    def __init__(self, in_chans: int, num_classes: int, channels: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive widths, got {list(channels)}")
        stages: list[nn.Module] = []
        width = in_chans
        for index, out in enumerate(channels):
            stride = (1, 2, 2) if index == 0 else (2, 2, 2)
            stages += [nn.Conv3d(width, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(out), nn.ReLU(inplace=True)]
            width = out
        self.stages = nn.Sequential(*stages)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # [B, C, T, H, W] -> [B, F, T', H', W']

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3, 4))  # [B, F, T', H', W'] -> [B, F]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# arch name -> the project's own classifiers of clips; any other arch is a timm model of images.
VIDEO_ARCHS: dict[str, Callable[..., nn.Module]] = {"video_cnn3d": VideoCNN3d}


def build_model(arch: str, arch_kwargs: dict[str, Any], in_chans: int, num_classes: int) -> nn.Module:
    """An untrained classifier: one of :data:`VIDEO_ARCHS` (clips) or a timm model name (images)."""
    if arch in VIDEO_ARCHS:
        return VIDEO_ARCHS[arch](in_chans=in_chans, num_classes=num_classes, **arch_kwargs)
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in arch_kwargs.items()}  # timm wants tuples
    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` over ``(uint8 images or clips, labels)`` batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(to_unit_float(images)).argmax(dim=1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


def check_media_item(x: torch.Tensor) -> tuple[int | None, int, int]:
    """``(frames or None, channels, side)`` of a square image ``[C, H, W]`` or clip ``[C, T, H, W]``."""
    if x.ndim not in (3, 4) or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the classifier takes square images [C, H, W] or clips [C, T, H, W]; got {list(x.shape)}")
    return (int(x.shape[1]) if x.ndim == 4 else None), int(x.shape[0]), int(x.shape[-1])


def fit_classifier(
    datamodule: MediaDataModule,
    out_path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    num_classes: int = 10,
    epochs: int = 4,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    trained_with: dict[str, Any] | None = None,
) -> Classifier:
    """Train a classifier on ``datamodule``'s train split, test it on its test split, save it to ``out_path``.

    Images train ``arch`` (default ``resnet10t``, a timm name); clips train
    one of :data:`VIDEO_ARCHS` (default ``video_cnn3d``). ``arch_kwargs``
    default to the chosen default arch's. AdamW with one-cycle learning rate,
    random horizontal flips (of every frame of a clip alike). Returns the
    trained classifier (in eval mode). ``trained_with``, the settings that
    produced it, is saved with it so that a later run can tell whether it fits.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    train_set, test_set = datamodule.dataset("train"), datamodule.dataset("test")
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=batch_size)
    frames, in_chans, image_size = check_media_item(train_set[0][0])  # uint8 [C, H, W] or [C, T, H, W]
    if frames is None:
        arch = DEFAULT_ARCH if arch is None else arch
        if arch in VIDEO_ARCHS:
            raise ValueError(f"arch {arch!r} classifies clips; the datamodule gives images: a timm name, e.g. {DEFAULT_ARCH!r}")
        default_kwargs = DEFAULT_ARCH_KWARGS if arch == DEFAULT_ARCH else {}
    else:
        arch = DEFAULT_VIDEO_ARCH if arch is None else arch
        if arch not in VIDEO_ARCHS:
            raise ValueError(f"arch {arch!r} cannot classify clips [C, T, H, W]; valid: {sorted(VIDEO_ARCHS)}")
        default_kwargs = DEFAULT_VIDEO_ARCH_KWARGS if arch == DEFAULT_VIDEO_ARCH else {}
    arch_kwargs = dict(default_kwargs if arch_kwargs is None else arch_kwargs)
    model = build_model(arch, arch_kwargs, in_chans, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * len(train_loader)
    if total_steps < 1:
        raise ValueError(f"the train split has fewer images than one batch ({batch_size}): nothing to train on")
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)

    start = time.perf_counter()
    model.train()
    with tqdm(total=total_steps, desc=f"fit classifier {arch}", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            for images, labels in train_loader:
                top_label = int(labels.max())
                if top_label >= num_classes:
                    raise ConfigError(
                        "data.num_classes", num_classes, f"at least {top_label + 1}: the train split has label {top_label}"
                    )
                images = to_unit_float(images)  # [B, C, H, W] or [B, C, T, H, W]
                flip = torch.rand(len(images)) < 0.5
                flip = flip.view(-1, *[1] * (images.ndim - 1))  # [B] -> [B, 1, 1, 1(, 1)]
                images = torch.where(flip, images.flip(-1), images)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    model.eval()
    test_accuracy = accuracy(model, test_loader)
    if progress:
        tqdm.write(f"classifier {arch}: test accuracy {test_accuracy:.4f} after {time.perf_counter() - start:.0f} s")

    classifier = Classifier(model, arch, image_size, in_chans, num_classes, test_accuracy, arch_kwargs, frames, trained_with)
    save_classifier(classifier, out_path)
    return classifier


def save_classifier(classifier: Classifier, path: str | Path) -> None:
    """Write ``classifier`` to ``path`` atomically (temp file in the same directory, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": classifier.arch,
        "arch_kwargs": classifier.arch_kwargs,
        "image_size": classifier.image_size,
        "in_chans": classifier.in_chans,
        "frames": classifier.frames,
        "num_classes": classifier.num_classes,
        "test_accuracy": classifier.test_accuracy,
        "trained_with": classifier.trained_with,
        "state_dict": classifier.model.state_dict(),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """The classifier saved at ``path``, in eval mode; :class:`ClassifierCheckpointError` if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierCheckpointError(
            f"no classifier checkpoint at {path}; train one with magnets.metrics.classifier.fit_classifier(datamodule, '{path}')"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF) on a corrupt file
        raise ClassifierCheckpointError(f"{path}: not a readable classifier checkpoint ({load_error_summary(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ClassifierCheckpointError(f"{path}: not a classifier checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise ClassifierCheckpointError(f"{path}: classifier checkpoint lacks {missing}")
    frames = payload.get("frames")  # absent in checkpoints from before clips: an image classifier
    if (frames is None) == (payload["arch"] in VIDEO_ARCHS):
        kind = "images" if frames is None else f"clips of {frames} frames"
        raise ClassifierCheckpointError(f"{path}: architecture {payload['arch']!r} does not classify {kind}, which the file says")
    try:
        model = build_model(payload["arch"], payload["arch_kwargs"], payload["in_chans"], payload["num_classes"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise ClassifierCheckpointError(
            f"{path}: weights do not match architecture {payload['arch']} {payload['arch_kwargs']}: {err}"
        ) from err
    model.to(map_location).eval().requires_grad_(False)
    return Classifier(
        model,
        payload["arch"],
        int(payload["image_size"]),
        int(payload["in_chans"]),
        int(payload["num_classes"]),
        float(payload["test_accuracy"]),
        dict(payload["arch_kwargs"]),
        None if frames is None else int(frames),
        payload.get("trained_with"),  # absent in checkpoints from before it was recorded
    )
