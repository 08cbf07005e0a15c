"""Image datasets and the Fashion-MNIST media datamodule (``magnets.data.base``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from magnets.data import fashion_mnist
from magnets.data.base import MediaLoaders, check_split


class ImageArrayDataset(Dataset):
    """Images ``[N, C, H, W]`` uint8 held in memory, served as uint8 ``[C, H, W]`` with int64 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad square images ``[N, H, W]`` to ``[N, 1, size, size]``, centred."""
    n, h, w = images.shape
    if h != w or size < h or (size - h) % 2:
        raise ValueError(f"cannot centre-pad {h}x{w} images to {size}x{size}: size must be >= {h} with an even margin")
    margin = (size - h) // 2
    out = np.zeros((n, 1, size, size), dtype=images.dtype)
    out[:, 0, margin : margin + h, margin : margin + w] = images  # [N, 1, size, size]
    return out


class FashionMNISTDataModule(MediaLoaders):
    """Fashion-MNIST, centre-padded to ``image_size``.

    ``val`` is a fixed, seeded draw of ``val_size`` images from the official
    train set (the rest is ``train``); ``test`` is the official test set.
    ``subset`` keeps only the first items of each split (tests, smoke runs).
    """

    content_size = 28  # the real image inside the padding

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        download_url: str = fashion_mnist.OFFICIAL_URL,
        search_debian: bool = True,
        subset: int | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size = image_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download_url = download_url
        self.search_debian = search_debian
        self.subset = subset
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prepare_data(self) -> None:
        # Locates (and if need be downloads) the files once per node, before setup.
        fashion_mnist.locate(self.root, self.download_url, self.search_debian)

    def media_info(self) -> dict[str, Any]:
        splits = {"val_size": self.val_size, "split_seed": self.split_seed, "subset": self.subset}
        return {"kind": "image", "resolution": [self.image_size, self.image_size], "channels": 1, "splits": splits}

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[N, 1, S, S]`` uint8 and labels ``[N]`` of ``train``, ``val`` or ``test``."""
        check_split(split)
        if not self._splits:
            self._load()
        return self._splits[split]

    def _load(self) -> None:
        train_images, train_labels = fashion_mnist.load_split("train", self.root, self.download_url, self.search_debian)
        test_images, test_labels = fashion_mnist.load_split("test", self.root, self.download_url, self.search_debian)
        if not 0 < self.val_size < len(train_images):
            raise ValueError(f"val_size={self.val_size} must lie in (0, {len(train_images)})")
        order = np.random.default_rng(self.split_seed).permutation(len(train_images))
        val_idx, train_idx = np.sort(order[: self.val_size]), np.sort(order[self.val_size :])
        parts = {
            "train": (train_images[train_idx], train_labels[train_idx]),
            "val": (train_images[val_idx], train_labels[val_idx]),
            "test": (test_images, test_labels),
        }
        for split, (images, labels) in parts.items():
            if self.subset is not None:
                images, labels = images[: self.subset], labels[: self.subset]
            self._splits[split] = (pad_to(images, self.image_size), labels)

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._load()

    def dataset(self, split: str, augment: bool | None = None) -> ImageArrayDataset:
        """Images of ``split``; ``augment`` is accepted for the protocol: these items are never augmented."""
        return ImageArrayDataset(*self.split_arrays(split))
