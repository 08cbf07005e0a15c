"""ILSVRC2012 (ImageNet-1k) as distributed: JPEG folders read with PIL, MaskGIT's preprocessing (``magnets.data.base``).

Layout under ``root``:

- ``train/<wnid>/*.JPEG``: the classes are the wnid folders of ``train/`` in
  sorted order; a class index is a wnid's position in that order (for
  ILSVRC2012, the order of the usual ``synsets.txt``: ``n01440764`` is 0).
- ``val/<wnid>/*.JPEG`` (class folders), or ``val/*.JPEG`` (flat) with a
  labels file: ``val_labels``, or the first of :data:`VAL_LABEL_FILES` found
  in ``root``. Two forms are read: text lines ``<file name> <wnid or 0-based
  class index>`` (``val.txt`` of Caffe's ``ilsvrc12`` archive, or any list
  derived from ``LOC_val_solution.csv``), and Kaggle's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``, whose first token is the wnid). Files are
  matched by name without extension.
- No labelled test split exists: ``dataset("test")`` raises (use ``val``).

Files ending in .jpeg, .jpg or .png (any case) are items, listed in sorted
order, so every run sees the same items in the same order; ``subset`` keeps
the first N of each split.

An item is ``(uint8 [3, S, S], label)``, MaskGIT's ImageNet preprocessing:
decode with PIL, convert to RGB (CMYK and greyscale JPEGs included), resize
the short side to ``S = image_size`` with PIL's bicubic filter, centre crop
``S x S``. PIL widens its resampling filter by the downscale factor, so the
resize is antialiased (as torchvision's ``Resize(antialias=True)`` and ADM's
``center_crop_arr``), never aliased as a plain bicubic sample would be. A file
that PIL cannot decode (truncated, corrupt, not an image) comes back as
``(zeros, UNREADABLE_LABEL)``: loaders drop it and tokenization lists it
with its reason (``why_unreadable``).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from magnets.data.base import UNREADABLE_LABEL, MediaLoaders, check_split
from magnets.errors import ConfigError, DataNotFoundError, UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # compared lower-case; ILSVRC names are *.JPEG (one train "JPEG" is a PNG)
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val.txt", "val_labels.txt")  # looked for in root when val/ is flat
PREPROCESSING = "maskgit: RGB, short side to image_size (PIL bicubic, antialiased), centre crop"
GET_DATA = (
    "download ILSVRC2012 (https://image-net.org/download, or Kaggle's imagenet-object-localization-challenge) "
    "and lay it out as <root>/train/<wnid>/*.JPEG and <root>/val/ (class folders, or flat with a labels file), "
    "or point data.module.root at such a folder"
)


class ImageNetLayoutError(UserError, ValueError):
    """The folders or the validation labels file are not the ILSVRC2012 layout: names the file and what is wrong."""


def center_crop_resize(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> uint8 ``[3, size, size]``: short side to ``size`` (bicubic, antialiased), centre crop."""
    width, height = image.size
    scale = size / min(width, height)
    if scale != 1:
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [S, S, 3] -> [3, S, S]


def decode_rgb(path: str | Path) -> Image.Image:
    """The file's pixels, decoded in full and converted to RGB; PIL's error when it cannot (truncated, corrupt, not an image)."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not later
        return image.convert("RGB")


class ImageFileDataset(Dataset):
    """Image files with labels as ``(uint8 [3, S, S], int label)``; an unreadable file gives ``(zeros, UNREADABLE_LABEL)``.

    Paths are held as one numpy bytes array (no Python object per item), so
    forked DataLoader workers do not copy the list page by page.
    """

    def __init__(self, root: Path, names: list[str], labels: list[int], image_size: int) -> None:
        if len(names) != len(labels):
            raise ValueError(f"{len(names)} files but {len(labels)} labels")
        self.root = root
        self.names = np.array([os.fsencode(name) for name in names], dtype=np.bytes_)  # paths relative to root
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.names[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = decode_rgb(self.path(index))
        except Exception:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error ...: the file's fault
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), UNREADABLE_LABEL
        return center_crop_resize(image, self.image_size), int(self.labels[index])

    def why_unreadable(self, index: int) -> dict[str, str]:
        """``{"path", "reason"}`` of an item that came back unreadable (decodes it again to get PIL's error)."""
        try:
            decode_rgb(self.path(index))
        except Exception as err:
            return {"path": str(self.path(index)), "reason": f"{type(err).__name__}: {err}"}
        return {"path": str(self.path(index)), "reason": "decoded on a second try"}


def list_images(directory: Path) -> list[str]:
    """Names of the image files in ``directory``, sorted."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def list_class_folders(directory: Path) -> list[str]:
    """Names of the (non-hidden) subfolders of ``directory``, sorted."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def read_val_labels(path: Path, classes: list[str]) -> dict[str, int]:
    """Validation labels by file name without extension.

    From Kaggle's ``LOC_val_solution.csv``, or text lines ``<file name> <wnid or 0-based class index>``.
    """
    index = {wnid: i for i, wnid in enumerate(classes)}
    labels: dict[str, int] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise ImageNetLayoutError(f"{path}: header must name ImageId,PredictionString; got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                wnid = (row["PredictionString"] or "").split()[:1]
                if not wnid or wnid[0] not in index:
                    raise ImageNetLayoutError(
                        f"{path}:{line}: {row['ImageId']}: {wnid[0] if wnid else 'no'} wnid is not a class of train/"
                    )
                labels[Path(row["ImageId"]).stem] = index[wnid[0]]
        return labels
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ImageNetLayoutError(f"{path}:{line}: expected '<file name> <wnid or 0-based class index>', got {text!r}")
        name, value = fields
        if value.isdigit():
            if int(value) >= len(classes):
                raise ImageNetLayoutError(f"{path}:{line}: class index {value} is not in 0..{len(classes) - 1}")
            labels[Path(name).stem] = int(value)
        elif value in index:
            labels[Path(name).stem] = index[value]
        else:
            raise ImageNetLayoutError(f"{path}:{line}: {value!r} is neither a wnid of train/ nor a class index")
    return labels


class ImageNetDataModule(MediaLoaders):
    """ILSVRC2012 ``train`` and ``val`` (module docstring: layout, preprocessing, unreadable files).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        image_size: the side of the centre crop.
        val_labels: the labels file of a flat ``val/`` (None: the first of :data:`VAL_LABEL_FILES` in ``root``).
        num_classes: when given, the number of wnid folders in ``train/`` must equal it.
        subset: keep the first N items of each split (smoke runs).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        val_labels: str | Path | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        subset: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("image_size", image_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.module.{key}", value, "a positive integer")
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise ConfigError("data.module.subset", subset, "null or a positive integer")
        self.root = Path(root)
        self.image_size = image_size
        self.val_labels = Path(val_labels) if val_labels is not None else None
        self.num_classes = num_classes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.subset = subset
        self._classes: list[str] | None = None
        self._items: dict[str, tuple[list[str], list[int]]] = {}

    def class_names(self) -> list[str]:
        """The wnids of ``train/``, sorted: class ``i`` is ``class_names()[i]``."""
        if self._classes is None:
            train = self.root / "train"
            if not train.is_dir():
                missing = self.root if not self.root.is_dir() else train
                raise DataNotFoundError(f"ImageNet not found: {missing} does not exist; {GET_DATA}")
            classes = list_class_folders(train)
            if not classes:
                raise DataNotFoundError(f"ImageNet not found: {train} holds no class folders (<wnid>/*.JPEG); {GET_DATA}")
            if self.num_classes is not None and len(classes) != self.num_classes:
                raise ConfigError("data.num_classes", self.num_classes, f"{len(classes)}, the number of class folders in {train}")
            self._classes = classes
        return self._classes

    def val_labels_file(self) -> Path:
        """Where the labels of a flat ``val/`` are: ``val_labels``, or the first of :data:`VAL_LABEL_FILES` in ``root``."""
        if self.val_labels is not None:
            if not self.val_labels.is_file():
                raise DataNotFoundError(
                    f"ImageNet validation labels file {self.val_labels} (data.module.val_labels) does not exist"
                )
            return self.val_labels
        for name in VAL_LABEL_FILES:
            if (self.root / name).is_file():
                return self.root / name
        raise DataNotFoundError(
            f"{self.root / 'val'} holds images without class folders and no labels file was found: set data.module.val_labels "
            f"to LOC_val_solution.csv or a '<file> <wnid or index>' list, or put one in {self.root} "
            f"as one of {', '.join(VAL_LABEL_FILES)}"
        )

    def items(self, split: str) -> tuple[list[str], list[int]]:
        """File names relative to ``root`` and class indices of ``split``, in a fixed (sorted) order."""
        check_split(split)
        if split == "test":
            raise ConfigError(
                "split",
                "test",
                "train or val: ImageNet's test images have no public labels; use val (tokenize.splits=[train,val])",
            )
        if split not in self._items:
            names, labels = self._list(split)
            if self.subset is not None:
                names, labels = names[: self.subset], labels[: self.subset]
            self._items[split] = (names, labels)
        return self._items[split]

    def _list(self, split: str) -> tuple[list[str], list[int]]:
        classes = self.class_names()
        directory = self.root / split
        if not directory.is_dir():
            raise DataNotFoundError(f"ImageNet {split} split not found: {directory} does not exist; {GET_DATA}")
        folders = list_class_folders(directory)
        names: list[str] = []
        labels: list[int] = []
        if folders:  # <split>/<wnid>/*.JPEG
            index = {wnid: i for i, wnid in enumerate(classes)}
            unknown = [f for f in folders if f not in index]
            if unknown:
                raise ImageNetLayoutError(
                    f"{directory / unknown[0]}: {len(unknown)} folders of {split}/ are not classes of train/"
                )
            for wnid in folders:
                files = list_images(directory / wnid)
                names += [f"{split}/{wnid}/{name}" for name in files]
                labels += [index[wnid]] * len(files)
            return names, labels
        labels_file = self.val_labels_file()  # flat val/*.JPEG
        by_stem = read_val_labels(labels_file, classes)
        files = list_images(directory)
        unlisted = [name for name in files if Path(name).stem not in by_stem]
        if unlisted:
            raise ImageNetLayoutError(f"{directory / unlisted[0]} is not listed in {labels_file} ({len(unlisted)} files are not)")
        absent = len(by_stem) - len(files)
        if absent > 0:
            log.warning("%s lists %d files that are not in %s", labels_file, absent, directory)
        return [f"{split}/{name}" for name in files], [by_stem[Path(name).stem] for name in files]

    def dataset(self, split: str, augment: bool | None = None) -> ImageFileDataset:
        """Images of ``split`` (``train`` or ``val``); ``augment`` is accepted for the protocol: items are never augmented."""
        names, labels = self.items(split)
        return ImageFileDataset(self.root, names, labels, self.image_size)

    def media_info(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "resolution": [self.image_size, self.image_size],
            "channels": 3,
            "preprocessing": PREPROCESSING,
            "splits": {"layout": "ilsvrc2012", "subset": self.subset},
        }

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",)}
        for split in splits.get(stage, ("train", "val")) if stage is not None else ("train", "val"):
            self.items(split)
