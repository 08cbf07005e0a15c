"""A small Fashion-MNIST classifier: the fast domain feature network for FID and class accuracy on CPU.

It is a timm model (by default a ``resnet10t`` slimmed to 32-256 channels,
1.2M parameters) trained by :func:`fit_classifier` on the project's
Fashion-MNIST datamodule, so it sees images exactly as the generative model
does: float ``[0, 1]``, one channel, centre-padded to ``image_size``. Its
penultimate layer (global-pooled features) feeds FID; its logits give the
class accuracy of generated samples.

A checkpoint is one ``torch.save`` file holding the state dict, the
architecture (timm name and keyword arguments), the input size and channel
count, and the test accuracy; it is written atomically and checked on load.
"""

from __future__ import annotations

import time
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
from magnets.errors import MismatchError
from magnets.files import atomic_write

CHECKPOINT_FORMAT = "magnets.classifier.v1"
DEFAULT_ARCH = "resnet10t"
# 32-256 channels instead of 64-512: 1.2M parameters, ~40 s per Fashion-MNIST epoch on one CPU thread.
DEFAULT_ARCH_KWARGS: dict[str, Any] = {"channels": [32, 64, 128, 256], "stem_width": 16}
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


def build_model(arch: str, arch_kwargs: dict[str, Any], in_chans: int, num_classes: int) -> nn.Module:
    """An untrained timm classifier (``arch`` must be a timm model name)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch_kwargs.items()}  # timm wants tuples
    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` over ``(uint8 images, labels)`` batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(to_unit_float(images)).argmax(dim=1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


def fit_classifier(
    datamodule: MediaDataModule,
    out_path: str | Path,
    arch: str = DEFAULT_ARCH,
    arch_kwargs: dict[str, Any] | None = None,
    num_classes: int = 10,
    epochs: int = 4,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Classifier:
    """Train a classifier on ``datamodule``'s train split, test it on its test split, save it to ``out_path``.

    AdamW with one-cycle learning rate, random horizontal flips. Returns the
    trained classifier (in eval mode).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    arch_kwargs = dict(DEFAULT_ARCH_KWARGS if arch_kwargs is None else arch_kwargs)
    torch.manual_seed(seed)
    train_set, test_set = datamodule.dataset("train"), datamodule.dataset("test")
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=batch_size)
    first_image = train_set[0][0]  # uint8 [C, H, W]
    if first_image.ndim != 3 or first_image.shape[-1] != first_image.shape[-2]:
        raise ValueError(f"the classifier takes square images [C, H, W]; the datamodule gives {list(first_image.shape)}")
    in_chans, image_size = first_image.shape[0], first_image.shape[-1]
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
                    raise ValueError(f"the train split has label {top_label}, which num_classes={num_classes} does not cover")
                images = to_unit_float(images)
                flip = torch.rand(len(images)) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
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

    classifier = Classifier(model, arch, image_size, in_chans, num_classes, test_accuracy, arch_kwargs)
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
        "num_classes": classifier.num_classes,
        "test_accuracy": classifier.test_accuracy,
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
        raise ClassifierCheckpointError(f"{path}: not a readable classifier checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ClassifierCheckpointError(f"{path}: not a classifier checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise ClassifierCheckpointError(f"{path}: classifier checkpoint lacks {missing}")
    model = build_model(payload["arch"], payload["arch_kwargs"], payload["in_chans"], payload["num_classes"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
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
    )
