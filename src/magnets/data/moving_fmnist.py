"""Moving Fashion-MNIST: the embedded video dataset, written as real lossless video files in the UCF101 and Kinetics layouts.

The Moving-MNIST recipe with Fashion-MNIST items: each item (resized to
``item_size``) starts at a random place in a square ``canvas`` with a random
direction, moves ``0.1 * velocity`` pixels per frame and has a velocity
component negated when it reaches a wall; several items are composited with
``max``. A video's label is its items' class.

Videos are grouped like UCF101's: 25 groups per class, ``clips_per_group``
clips each; a group's clips share the item images (drawn from the
Fashion-MNIST test set for groups 1-7, the train set otherwise: fold 1's
test groups, so fold 1 tests on items never seen in training; folds 2 and 3
move other groups to test and do not keep that property) and differ in
their motion. Files are H.264 RGB at qp 0 (``libx264rgb``), which decord
reads back bit-exactly, grey frames stored as R = G = B.

- ``ucf101`` layout: ``<Class>/v_<Class>_gXX_cYY.avi`` and
  ``ucfTrainTestlist/{classInd,trainlist0k,testlist0k}.txt`` for folds 1-3
  (CRLF), UCF101's case quirk reproduced: ``AnkleBoot/`` holds
  ``v_Ankleboot_*`` files, the lists say ``AnkleBoot/v_AnkleBoot_*``.
- ``kinetics600`` layout: ``annotations/{train,validate,test}.csv`` and
  ``<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (Kinetics-style labels
  with spaces); groups 1-7 are test, group 8 validate, the rest train.

A folder is generated once, into a temporary folder beside it that is
renamed into place when complete; ``moving_fmnist.json`` in it records the
generator's settings, and a folder generated with other settings is refused.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from magnets.data import fashion_mnist
from magnets.data.video import (
    DECODE_ERRORS,
    KineticsLayout,
    UCF101Layout,
    VideoDataModule,
    VideoEntry,
    VideoProbe,
    kinetics_clip_name,
    open_video,
)
from magnets.errors import ConfigError

CLASS_NAMES = ("TShirtTop", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "AnkleBoot")
KINETICS_LABELS = ("t shirt top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILE_CLASS_NAMES = {"AnkleBoot": "Ankleboot"}  # file names that differ in case from their folder (UCF101's HandStandPushups)
GROUPS = 25  # per class, as in UCF101
FOLD_GROUPS = 7  # fold k tests on groups 7(k-1)+1 .. 7k, as in UCF101
LAYOUTS = ("ucf101", "kinetics600")
SPEC_FILE = "moving_fmnist.json"

ImageSource = Callable[[str], tuple[np.ndarray, np.ndarray]]  # "train" | "test" -> images [N, 28, 28], labels [N]


@dataclass(frozen=True)
class MovingFMNISTSpec:
    """What the generator makes: canvas and item sides (pixels), items per video, video length, clips per group.

    ``speed`` is the velocity's magnitude; an item moves ``0.1 * speed``
    pixels per frame (20 -> 2 pixels, across a 32-pixel canvas in ~16 frames).
    """

    canvas: int = 32
    item_size: int = 16
    num_items: int = 1
    video_frames: int = 24
    clips_per_group: int = 5
    speed: float = 20.0
    fps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.item_size <= self.canvas:
            raise ConfigError("data.module.item_size", self.item_size, f"1..canvas ({self.canvas})")
        for key in ("canvas", "num_items", "video_frames", "clips_per_group", "fps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.module.{key}", getattr(self, key), "a positive integer")

    @property
    def videos(self) -> int:
        return len(CLASS_NAMES) * GROUPS * self.clips_per_group


def resize_items(images: np.ndarray, size: int) -> np.ndarray:
    """Images ``[N, h, w]`` uint8 -> ``[N, size, size]`` uint8 (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None]  # [N, 1, h, w]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def bouncing_path(rng: np.random.Generator, frames: int, limit: float, speed: float) -> np.ndarray:
    """Top-left positions ``[T, 2]`` (y, x) in ``[0, limit]``: ``position += 0.1 * velocity``, negated at a wall."""
    position = rng.uniform(0.0, limit, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    velocity = speed * np.array([math.sin(angle), math.cos(angle)])
    path = np.empty((frames, 2))
    for t in range(frames):
        path[t] = position
        position = position + 0.1 * velocity
        for d in range(2):
            if position[d] < 0:
                position[d], velocity[d] = -position[d], -velocity[d]
            elif position[d] > limit:
                position[d], velocity[d] = 2 * limit - position[d], -velocity[d]
        position = np.clip(position, 0.0, limit)  # a step longer than the free range reflects only once
    return path


def moving_clip(items: np.ndarray, rng: np.random.Generator, frames: int, canvas: int, speed: float) -> np.ndarray:
    """Items ``[K, s, s]`` uint8 bouncing in a ``canvas`` square -> frames ``[T, canvas, canvas]`` uint8 (composited with max)."""
    size = items.shape[-1]
    video = np.zeros((frames, canvas, canvas), dtype=np.uint8)
    for item in items:
        path = np.rint(bouncing_path(rng, frames, canvas - size, speed)).astype(int)  # [T, 2]
        for t, (y, x) in enumerate(path):
            np.maximum(video[t, y : y + size, x : x + size], item, out=video[t, y : y + size, x : x + size])
    return video


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """Frames ``[T, H, W]`` (grey) or ``[T, H, W, 3]`` (RGB) uint8 -> a lossless H.264 RGB file (``libx264rgb``, qp 0).

    The container follows ``path``'s suffix (.avi, .mp4, .mkv); decord reads the frames back bit-exactly.
    """
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)  # [T, H, W] -> [T, H, W, 3]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "ultrafast", "bframes": "0", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def reads_back_exactly(path: Path, frames: np.ndarray) -> bool:
    """Whether decord reads ``frames`` ``[T, H, W, 3]``, written to ``path`` by :func:`write_video`, back unchanged.

    decord 0.6 cannot return frames of a few narrow widths (e.g. 8, 12, 16, 24, 48, 72 pixels).
    """
    write_video(path, frames)
    try:
        with open_video(path) as reader:
            back = reader.get_batch(list(range(len(frames)))).asnumpy()
    except DECODE_ERRORS:
        return False
    finally:
        path.unlink()
    return back.shape == frames.shape and bool((back == frames).all())


@dataclass(frozen=True)
class PlannedVideo:
    label: int
    group: int  # 1..25
    clip: int  # 1..clips_per_group


def videos(spec: MovingFMNISTSpec, load_images: ImageSource) -> Iterator[tuple[PlannedVideo, np.ndarray]]:
    """Every video of ``spec`` with its frames ``[T, canvas, canvas]``, class by class, group by group; one seeded RNG."""
    rng = np.random.default_rng(spec.seed)
    pools = {}
    for split in ("train", "test"):
        images, labels = load_images(split)
        pools[split] = [resize_items(images[labels == c], spec.item_size) for c in range(len(CLASS_NAMES))]
        for c, pool in enumerate(pools[split]):
            if len(pool) < spec.num_items:
                raise ValueError(f"Fashion-MNIST {split} holds {len(pool)} images of class {c}; {spec.num_items} needed")
    for label in range(len(CLASS_NAMES)):
        for group in range(1, GROUPS + 1):
            pool = pools["test" if group <= FOLD_GROUPS else "train"][label]
            items = pool[rng.choice(len(pool), size=spec.num_items, replace=False)]  # [K, s, s], shared by the group
            for clip in range(1, spec.clips_per_group + 1):
                yield PlannedVideo(label, group, clip), moving_clip(items, rng, spec.video_frames, spec.canvas, spec.speed)


def ucf_name(video: PlannedVideo) -> tuple[str, str]:
    """(as listed, as on disk): ``Class/v_Class_gXX_cYY.avi``; the file's class name may differ in case."""
    folder = CLASS_NAMES[video.label]
    suffix = f"_g{video.group:02d}_c{video.clip:02d}.avi"
    return f"{folder}/v_{folder}{suffix}", f"{folder}/v_{FILE_CLASS_NAMES.get(folder, folder)}{suffix}"


def kinetics_row(video: PlannedVideo, spec: MovingFMNISTSpec) -> dict[str, str]:
    """A Kinetics annotation row: an 11-character youtube_id, 10-second times, the group's split."""
    index = (video.label * GROUPS + video.group - 1) * spec.clips_per_group + video.clip - 1
    split = "test" if video.group <= FOLD_GROUPS else "val" if video.group == FOLD_GROUPS + 1 else "train"
    start = 10 * (video.clip - 1)
    row = {"label": KINETICS_LABELS[video.label], "youtube_id": f"mfmnist{index:04d}", "time_start": str(start)}
    return {**row, "time_end": str(start + 10), "split": split}


def write_ucf101(out: Path, generated: Iterator[tuple[PlannedVideo, np.ndarray]], fps: int) -> None:
    """Video files and the UCF101 split lists (three folds, CRLF line ends) under ``out``."""
    listed: list[tuple[PlannedVideo, str]] = []
    for video, frames in generated:
        as_listed, on_disk = ucf_name(video)
        write_video(out / on_disk, frames, fps)
        listed.append((video, as_listed))
    lists = out / "ucfTrainTestlist"
    lists.mkdir()
    crlf = partial(open, newline="\r\n")
    with crlf(lists / "classInd.txt", "w") as f:
        f.writelines(f"{i + 1} {name}\n" for i, name in enumerate(CLASS_NAMES))
    for fold in (1, 2, 3):
        test_groups = range(FOLD_GROUPS * (fold - 1) + 1, FOLD_GROUPS * fold + 1)
        with crlf(lists / f"trainlist{fold:02d}.txt", "w") as train, crlf(lists / f"testlist{fold:02d}.txt", "w") as test:
            for video, name in listed:
                if video.group in test_groups:
                    test.write(f"{name}\n")
                else:
                    train.write(f"{name} {video.label + 1}\n")


def write_kinetics(out: Path, generated: Iterator[tuple[PlannedVideo, np.ndarray]], spec: MovingFMNISTSpec) -> None:
    """Video files ``<label>/<youtube_id>_<start>_<end>.mp4`` and ``annotations/{train,validate,test}.csv`` under ``out``."""
    rows: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for video, frames in generated:
        row = kinetics_row(video, spec)
        path = out / row["label"] / kinetics_clip_name(row["youtube_id"], row["time_start"], row["time_end"])
        write_video(path, frames, spec.fps)
        rows[row["split"]].append(row)
    (out / "annotations").mkdir()
    for split, name in KineticsLayout.csv_names.items():
        with open(out / "annotations" / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writeheader()
            writer.writerows(rows[split])


def generate(root: str | Path, layout: str, spec: MovingFMNISTSpec, load_images: ImageSource) -> Path:
    """Write the dataset of ``spec`` in ``layout`` at ``root`` unless it is there; return ``root``.

    ``load_images(split)`` gives Fashion-MNIST ``train``/``test`` images
    ``[N, 28, 28]`` uint8 and labels ``[N]``. The folder appears complete or
    not at all (a temporary folder beside it is renamed into place).
    """
    if layout not in LAYOUTS:
        raise ConfigError("data.module.layout", layout, LAYOUTS)
    root = Path(root)
    wanted = {"layout": layout, **asdict(spec)}
    if root.exists():
        spec_path = root / SPEC_FILE
        found = json.loads(spec_path.read_text()) if spec_path.is_file() else None
        if found != wanted:
            raise ConfigError(
                "data.root", str(root.parent), f"a folder whose {root.name}/ was generated with {wanted} (it holds {found}); "
                "delete it to generate it again, or choose another data.root",
            )  # fmt: skip
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        noise = np.random.default_rng(0).integers(0, 256, (2, spec.canvas, spec.canvas, 3), dtype=np.uint8)
        if not reads_back_exactly(tmp / "round_trip.mp4", noise):
            raise ConfigError("data.module.canvas", spec.canvas, "a size whose frames decord reads back exactly, e.g. 32 or 64")
        generated = tqdm(videos(spec, load_images), total=spec.videos, desc=f"moving fmnist ({layout})", unit="video")
        if layout == "ucf101":
            write_ucf101(tmp, generated, spec.fps)
        else:
            write_kinetics(tmp, generated, spec)
        (tmp / SPEC_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / SPEC_FILE).is_file():  # not another process's complete copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class MovingFMNISTDataModule(VideoDataModule):
    """Moving Fashion-MNIST read by the UCF101 (``layout: ucf101``) or Kinetics-600 (``kinetics600``) reader.

    The videos are in ``<root>/<layout>/``, generated there first when
    missing and ``generate`` is true (from Fashion-MNIST at ``fmnist_root``).
    The generator's settings are :class:`MovingFMNISTSpec`'s fields
    (``generator_seed`` is its ``seed``); the rest are the reader's
    (:class:`magnets.data.video.UCF101DataModule`); ``fold`` and
    ``val_size`` apply to the UCF101 layout only.
    """

    def __init__(
        self,
        root: str | Path,
        layout: str = "ucf101",
        generate: bool = True,
        fmnist_root: str | Path = "data/fashion-mnist",
        search_debian: bool = True,
        download_url: str = fashion_mnist.OFFICIAL_URL,
        canvas: int = 32,
        item_size: int = 16,
        num_items: int = 1,
        video_frames: int = 24,
        clips_per_group: int = 5,
        speed: float = 20.0,
        fps: int = 25,
        generator_seed: int = 0,
        frames: int = 17,
        stride: int = 1,
        size: int = 32,
        channels: int = 1,
        fold: int = 1,
        val_size: int = 100,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        report_dir: str | Path | None = None,
        scan_workers: int = 2,
    ) -> None:
        if layout not in LAYOUTS:
            raise ConfigError("data.module.layout", layout, LAYOUTS)
        self.spec = MovingFMNISTSpec(canvas, item_size, num_items, video_frames, clips_per_group, speed, fps, generator_seed)
        self.generate_missing, self.layout_name = generate, layout
        self.load_images: ImageSource = partial(
            fashion_mnist.load_split, root=Path(fmnist_root), base_url=download_url, search_debian=search_debian
        )
        folder = Path(root) / layout
        if layout == "ucf101":
            video_layout: UCF101Layout | KineticsLayout = UCF101Layout(folder, fold=fold, val_size=val_size, seed=seed)
        else:
            video_layout = KineticsLayout(folder)
        video_layout.name = f"Moving Fashion-MNIST ({layout})"
        video_layout.get_data = f"generate it with data.module.generate=true (from Fashion-MNIST at {fmnist_root})"
        super().__init__(video_layout, frames, stride, size, channels, batch_size, num_workers, report_dir, scan_workers)

    def prepare_data(self) -> None:
        if self.generate_missing:
            generate(self.layout.root, self.layout_name, self.spec, self.load_images)

    def items(self, split: str) -> list[tuple[VideoEntry, VideoProbe]]:
        self.prepare_data()  # a no-op once generated; tokenization may ask for a split before Lightning's prepare_data
        return super().items(split)
