"""Video datasets read with decord: UCF101 and Kinetics-600 layouts as distributed, clips of T frames at a stride.

An item is ``(x uint8 [C, T, H, W], label int)``: T frames ``stride`` apart,
the short side resized to ``size`` (bilinear, antialiased) and centre-cropped
to ``size x size``, RGB (``channels: 3``) or BT.601 luma (``channels: 1``).
Training draws the clip's first frame uniformly from every valid start (from
torch's RNG, which each DataLoader worker seeds on its own); evaluation (val,
test) always takes the centre clip, ``start = (n - span) // 2``.

Every listed file is probed once per split when the split is first used
(open, count frames; a thread pool, remembered in ``<report_dir>/probe_cache.json``
by path, size and mtime). A file that is missing, unreadable, truncated or
shorter than a clip (``span = 1 + (T - 1) * stride`` frames) is a counted
skip: it is listed with its reason in ``<report_dir>/<split>_skips.json`` and
a warning gives the count and that path. ``python -m magnets.data.check``
decodes every frame of every file, for what a probe cannot see.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import av
import decord
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from magnets.choices import SPLITS
from magnets.data.base import MediaLoaders, check_split
from magnets.errors import ConfigError, DataNotFoundError, UserError
from magnets.files import atomic_write_json

log = logging.getLogger(__name__)

LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B
DECODE_ERRORS = (decord.DECORDError, av.FFmpegError, RuntimeError, ValueError, OSError)
PROBE_CACHE_VERSION = 1


class SplitListError(UserError, ValueError):
    """A split list or annotation file is malformed: names the file, the line and what is wrong."""


class VideoDecodeError(RuntimeError):
    """A file that passed the probe failed to decode while training: names the file and the check command."""


@dataclass(frozen=True)
class VideoEntry:
    """One listed video: where it should be (``path``), its class index, and the name the list gives it."""

    path: Path
    label: int
    listed_as: str


@dataclass(frozen=True)
class VideoProbe:
    """What opening a file tells: decodable frame count, average fps, frame size."""

    frames: int
    fps: float
    height: int
    width: int


class BadVideo(Exception):
    """A video that cannot serve as an item; ``str(err)`` is the reason written in reports."""


def clip_span(frames: int, stride: int) -> int:
    """Frames a clip covers: ``1 + (frames - 1) * stride``."""
    return 1 + (frames - 1) * stride


def probe_video(path: Path) -> VideoProbe:
    """Open ``path`` with PyAV (header) and decord (the reader), decode its first frame; raise :class:`BadVideo`.

    A file whose header declares more frames than decord finds (an AVI cut
    short: decord counts the packets that are there) is ``truncated``.
    """
    if not path.is_file():
        raise BadVideo("missing")
    if path.stat().st_size == 0:
        raise BadVideo("unreadable: empty file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo("unreadable: no video stream")
            declared = container.streams.video[0].frames  # 0 when the container does not say
    except DECODE_ERRORS as err:
        raise BadVideo(f"unreadable: {err}") from err
    try:
        with open_video(path) as reader:
            frames, fps = len(reader), float(reader.get_avg_fps())
            if frames == 0:
                raise BadVideo("unreadable: no frames")
            height, width = reader.get_batch([0]).asnumpy().shape[1:3]  # the first frame, read as items are
    except DECODE_ERRORS as err:
        raise BadVideo(f"unreadable: {err}") from err
    if declared > frames + 1:  # some muxers count one frame more than they store; a cut file loses many
        raise BadVideo(f"truncated: header declares {declared} frames, {frames} are in the file")
    return VideoProbe(frames=frames, fps=fps, height=int(height), width=int(width))


def too_short_reason(probe: VideoProbe, frames: int, stride: int) -> str | None:
    span = clip_span(frames, stride)
    if probe.frames < span:
        return f"too short: {probe.frames} frames, a clip of {frames} at stride {stride} needs {span}"
    return None


@contextmanager
def open_video(path: Path) -> Iterator[decord.VideoReader]:
    """One decord reader of ``path`` (single-threaded, on the CPU), released when the block ends.

    Decord's own errors propagate (see :data:`DECODE_ERRORS`); callers turn them into their reason.
    """
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        yield reader
    finally:
        del reader


def read_clip(path: Path, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` of ``path`` as ``[T, H, W, 3]`` uint8 RGB, one decord reader opened and released."""
    try:
        with open_video(path) as reader:
            return reader.get_batch(list(indices)).asnumpy()
    except DECODE_ERRORS as err:
        raise VideoDecodeError(
            f"cannot decode {path} ({err}); run `make data-check` (python -m magnets.data.check) to list every bad file"
        ) from err


def to_clip_tensor(frames: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """RGB frames ``[T, H, W, 3]`` uint8 -> ``[C, T, size, size]`` uint8: grey if ``channels == 1``, resize, centre crop.

    The short side is resized to ``size`` (bilinear, antialiased) and the
    centre ``size x size`` kept; frames already that size are not touched.
    """
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, H, W, 3] -> [T, 3, H, W]
    h, w = x.shape[-2:]
    resize = min(h, w) != size
    if resize:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
    if channels == 1 or resize:
        y = x.float()
        if channels == 1:
            y = (y * LUMA.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # [T, 1, H, W]
        if resize:
            y = F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size]  # [T, C, size, size]
    return x.permute(1, 0, 2, 3).contiguous()  # [T, C, S, S] -> [C, T, S, S]


class VideoClipDataset(Dataset):
    """Clips of probed videos: ``(uint8 [C, T, size, size], label)``; a random start when ``train``, the centre one otherwise."""

    def __init__(
        self,
        items: Sequence[tuple[VideoEntry, VideoProbe]],
        frames: int,
        stride: int,
        size: int,
        channels: int,
        train: bool,
    ) -> None:
        self.paths = [entry.path for entry, _ in items]
        self.labels = [entry.label for entry, _ in items]
        self.lengths = [probe.frames for _, probe in items]
        self.frames, self.stride, self.size, self.channels, self.train = frames, stride, size, channels, train
        short = [p for p, n in zip(self.paths, self.lengths, strict=True) if n < clip_span(frames, stride)]
        if short:
            raise ValueError(f"{len(short)} videos are shorter than a clip, e.g. {short[0]}: they should have been skipped")

    def __len__(self) -> int:
        return len(self.paths)

    def start(self, index: int) -> int:
        """First frame of item ``index``'s clip: uniform over valid starts in training, the centre clip otherwise."""
        last_start = self.lengths[index] - clip_span(self.frames, self.stride)
        if self.train:
            return int(torch.randint(0, last_start + 1, ()).item())
        return last_start // 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start = self.start(index)
        indices = range(start, start + clip_span(self.frames, self.stride), self.stride)
        frames = read_clip(self.paths[index], indices)  # [T, H, W, 3]
        return to_clip_tensor(frames, self.size, self.channels), self.labels[index]


class FolderIndex:
    """Finds ``<folder>/<file>`` under ``root`` ignoring case (UCF101: ``HandstandPushups/`` holds ``v_HandStandPushups_*``).

    Folder names also match with spaces written as underscores (Kinetics
    labels such as ``playing bagpipes``). Folders are listed once, on first use.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folders: dict[str, Path] | None = None
        self._files: dict[Path, dict[str, str]] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().replace(" ", "_")

    def resolve(self, folder: str, name: str) -> Path:
        """The file on disk, or where the list says it is when nothing matches (then reported ``missing``)."""
        listed = self.root / folder / name
        if listed.is_file():
            return listed
        if self._folders is None:
            self._folders = {self._key(p.name): p for p in self.root.iterdir() if p.is_dir()} if self.root.is_dir() else {}
        directory = self._folders.get(self._key(folder))
        if directory is None:
            return listed
        if directory not in self._files:
            self._files[directory] = {p.name.lower(): p.name for p in directory.iterdir()}
        actual = self._files[directory].get(name.lower())
        return directory / actual if actual is not None else listed


class VideoLayout(Protocol):
    """Where a dataset's videos and split lists are: classes and each split's listed files."""

    name: str
    root: Path
    get_data: str

    def class_names(self) -> list[str]: ...

    def entries(self, split: str) -> list[VideoEntry]: ...

    def list_file(self, split: str) -> Path: ...

    def split_rule(self) -> dict[str, Any]: ...


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a split list with their 1-based numbers, CR/LF stripped."""
    return [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]


def read_ucf_class_index(path: Path) -> list[str]:
    """``classInd.txt`` (``"1 ApplyEyeMakeup"`` per line) -> class names in index order."""
    names: dict[int, str] = {}
    for number, line in _read_lines(path):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise SplitListError(f"{path}:{number}: expected '<index> <ClassName>', got {line!r}")
        names[int(fields[0])] = fields[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise SplitListError(f"{path}: class indices must run 1..{len(names)}, got {sorted(names)[:5]}...")
    return [names[i] for i in range(1, len(names) + 1)]


def read_ucf_list(path: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """``trainlist0k.txt`` (``"Class/v_Class_g08_c01.avi 1"``, 1-based) or ``testlist0k.txt`` (path only) -> (path, label).

    Without a label field the label is the class folder's index in
    ``class_names``, matched ignoring case.
    """
    by_name = {name.lower(): i for i, name in enumerate(class_names)}
    items = []
    for number, line in _read_lines(path):
        fields = line.split()
        if len(fields) not in (1, 2) or "/" not in fields[0]:
            raise SplitListError(f"{path}:{number}: expected '<Class>/<file>.avi [label]', got {line!r}")
        listed = fields[0]
        if len(fields) == 2:
            if not fields[1].isdigit() or not 1 <= int(fields[1]) <= len(class_names):
                raise SplitListError(f"{path}:{number}: label {fields[1]!r} is not in 1..{len(class_names)}")
            label = int(fields[1]) - 1
        else:
            folder = listed.split("/")[0].lower()
            if folder not in by_name:
                raise SplitListError(f"{path}:{number}: class folder {listed.split('/')[0]!r} is not in classInd.txt")
            label = by_name[folder]
        items.append((listed, label))
    return items


UCF_GROUP = re.compile(r"v_(?P<action>[^/]+)_g(?P<group>\d+)_c\d+\.\w+$", re.IGNORECASE)


def held_out_groups(names: list[str], val_size: int, seed: int) -> list[bool]:
    """Which listed clips form ``val``: whole UCF101 groups (``<action>, gXX``), drawn in a seeded order until they
    hold at least ``val_size`` clips. The clips of one group are cut from one long video, so splitting a group
    would leak it into both splits. A name outside the ``v_<Action>_gXX_cYY`` pattern is a group of its own.
    """
    if val_size == 0:
        return [False] * len(names)
    keys = []
    for name in names:
        match = UCF_GROUP.search(name)
        keys.append((match["action"].lower(), int(match["group"])) if match else (name, -1))
    groups = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(groups))
    sizes = {key: keys.count(key) for key in groups}
    chosen, count = set(), 0
    for index in order:
        if count >= val_size:
            break
        chosen.add(groups[index])
        count += sizes[groups[index]]
    return [key in chosen for key in keys]


class UCF101Layout:
    """UCF101 as distributed: ``<root>/<Class>/v_<Class>_gXX_cYY.avi`` and ``<split_dir>/{classInd,trainlist0k,testlist0k}.txt``.

    ``train`` is the fold's train list less a seeded hold-out of whole groups
    holding at least ``val_size`` clips, which is ``val`` (:func:`held_out_groups`);
    ``test`` is the fold's test list.
    """

    name = "UCF101"
    get_data = (
        "download UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip from https://www.crcv.ucf.edu/data/UCF101.php "
        "and extract both into it (<Class>/v_*.avi and ucfTrainTestlist/), or point data.root at such a folder"
    )

    def __init__(self, root: str | Path, fold: int = 1, split_dir: str | Path | None = None, val_size: int = 0, seed: int = 0):
        if fold not in (1, 2, 3):
            raise ConfigError("data.module.fold", fold, [1, 2, 3])
        if val_size < 0:
            raise ConfigError("data.module.val_size", val_size, "a non-negative integer")
        self.root = Path(root)
        self.split_dir = Path(split_dir) if split_dir is not None else self.root / "ucfTrainTestlist"
        self.fold, self.val_size, self.seed = fold, val_size, seed
        self._files = FolderIndex(self.root)

    def _require(self, path: Path) -> Path:
        if not self.root.is_dir():
            raise DataNotFoundError(f"{self.name} not found: {self.root} does not exist; {self.get_data}")
        if not path.is_file():
            raise DataNotFoundError(f"{self.name} split list {path} not found (looked in {self.split_dir}); {self.get_data}")
        return path

    def class_names(self) -> list[str]:
        return read_ucf_class_index(self._require(self.split_dir / "classInd.txt"))

    def split_rule(self) -> dict[str, Any]:
        """What decides which videos form each split (recorded in token shards' meta)."""
        return {"layout": "ucf101", "fold": self.fold, "val_size": self.val_size, "seed": self.seed}

    def list_file(self, split: str) -> Path:
        check_split(split)
        kind = "test" if split == "test" else "train"
        return self.split_dir / f"{kind}list{self.fold:02d}.txt"

    def entries(self, split: str) -> list[VideoEntry]:
        listed = read_ucf_list(self._require(self.list_file(split)), self.class_names())
        if split != "test":
            if self.val_size >= len(listed):
                raise ConfigError("data.module.val_size", self.val_size, f"less than the {len(listed)} entries of the train list")
            held_out = held_out_groups([name for name, _ in listed], self.val_size, self.seed)
            listed = [item for item, in_val in zip(listed, held_out, strict=True) if in_val == (split == "val")]
        return [VideoEntry(self._files.resolve(*name.split("/", 1)), label, name) for name, label in listed]


def read_kinetics_csv(path: Path, require_label: bool = True) -> list[dict[str, str]]:
    """Rows of a Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``), checked for those columns.

    With ``require_label`` false (the test CSV: the Kinetics test set was
    first released without labels) a missing ``label`` column or value gives
    label ``""``; otherwise it is an error naming the file and line.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        needed = {"youtube_id", "time_start", "time_end"} | ({"label"} if require_label else set())
        if not needed <= columns:
            raise SplitListError(f"{path}: header must name label,youtube_id,time_start,time_end,split; got {reader.fieldnames}")
        rows = [{**row, "label": row.get("label") or ""} for row in reader]
    unlabelled = [line for line, row in enumerate(rows, start=2) if require_label and not row["label"]]
    if unlabelled:
        raise SplitListError(f"{path}:{unlabelled[0]}: no label ({len(unlabelled)} rows without one)")
    return rows


def kinetics_clip_name(youtube_id: str, time_start: str, time_end: str) -> str:
    """``<youtube_id>_<start:06d>_<end:06d>.mp4`` (times in whole seconds)."""
    return f"{youtube_id}_{int(float(time_start)):06d}_{int(float(time_end)):06d}.mp4"


class KineticsLayout:
    """Kinetics-600: ``<split_dir>/{train,validate,test}.csv``, clips ``<root>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4``.

    Class indices are the sorted label names of ``train.csv``; an item
    without a label (a test CSV without the column) has label -1.
    """

    name = "Kinetics-600"
    get_data = (
        "download the Kinetics-600 annotations (train.csv, validate.csv, test.csv) and clips, e.g. with "
        "https://github.com/cvdfoundation/kinetics-dataset, into <root>/annotations and <root>/<label>/, "
        "or point data.root at such a folder"
    )
    csv_names = {"train": "train.csv", "val": "validate.csv", "test": "test.csv"}

    def __init__(self, root: str | Path, split_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        self.split_dir = Path(split_dir) if split_dir is not None else self.root / "annotations"
        self._files = FolderIndex(self.root)
        self._class_names: list[str] | None = None

    def list_file(self, split: str) -> Path:
        check_split(split)
        return self.split_dir / self.csv_names[split]

    def split_rule(self) -> dict[str, Any]:
        """What decides which videos form each split (recorded in token shards' meta)."""
        return {"layout": "kinetics600"}

    def _rows(self, split: str) -> list[dict[str, str]]:
        path = self.list_file(split)
        if not self.root.is_dir():
            raise DataNotFoundError(f"{self.name} not found: {self.root} does not exist; {self.get_data}")
        if not path.is_file():
            raise DataNotFoundError(f"{self.name} annotations {path} not found (looked in {self.split_dir}); {self.get_data}")
        return read_kinetics_csv(path, require_label=split != "test")

    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = sorted({row["label"] for row in self._rows("train")})
        return self._class_names

    def entries(self, split: str) -> list[VideoEntry]:
        index = {name: i for i, name in enumerate(self.class_names())}
        entries = []
        for row in self._rows(split):
            label = row["label"]
            if label and label not in index:
                where = f"{self.list_file(split)}: label {label!r} of {row['youtube_id']}"
                raise SplitListError(f"{where} is not a label of train.csv")
            name = kinetics_clip_name(row["youtube_id"], row["time_start"], row["time_end"])
            path = self._files.resolve(label, name) if label else self.root / name
            entries.append(VideoEntry(path, index[label] if label else -1, f"{label}/{name}" if label else name))
        return entries


class ProbeCache:
    """Probe results remembered in a JSON file by path, size and mtime, so a second run opens no file twice."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == PROBE_CACHE_VERSION:
                    self.entries = data["entries"]
            except ValueError:
                log.warning("ignoring unreadable probe cache %s", path)

    @staticmethod
    def _stamp(path: Path) -> list[int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    def probe(self, path: Path) -> VideoProbe | str:
        """``probe_video(path)``, or the reason it is a bad video."""
        stamp = self._stamp(path)
        cached = self.entries.get(str(path))
        if stamp is not None and cached is not None and cached["stamp"] == stamp:
            return cached["reason"] if "reason" in cached else VideoProbe(**cached["probe"])
        try:
            result: VideoProbe | str = probe_video(path)
        except BadVideo as err:
            result = str(err)
        if stamp is not None:  # a missing file is looked for again next time
            found = {"reason": result} if isinstance(result, str) else {"probe": asdict(result)}
            self.entries[str(path)] = {"stamp": stamp, **found}
        return result

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"version": PROBE_CACHE_VERSION, "entries": self.entries})


def probe_all(paths: Sequence[Path], cache: ProbeCache, workers: int, desc: str) -> list[VideoProbe | str]:
    """Probe ``paths`` in a thread pool (decord and PyAV release the GIL), with a progress bar; results in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(cache.probe, paths), total=len(paths), desc=desc, unit="file", disable=None, leave=False))


class VideoDataModule(MediaLoaders):
    """A video layout's splits as clip datasets and loaders; the media datamodule seam (:mod:`magnets.data.base`).

    Args:
        layout: where the videos and split lists are (:class:`UCF101Layout`, :class:`KineticsLayout`).
        frames, stride: a clip is ``frames`` frames ``stride`` apart.
        size: the clip's side after the short-side resize and centre crop.
        channels: 3 keeps RGB, 1 converts to grey.
        report_dir: where ``<split>_skips.json`` and the probe cache go (None: nowhere).
        scan_workers: threads that probe files.
    """

    def __init__(
        self,
        layout: VideoLayout,
        frames: int,
        stride: int = 1,
        size: int = 128,
        channels: int = 3,
        batch_size: int = 8,
        num_workers: int = 0,
        report_dir: str | Path | None = None,
        scan_workers: int = 4,
    ) -> None:
        super().__init__()
        for key, value in (("frames", frames), ("stride", stride), ("size", size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.module.{key}", value, "a positive integer")
        if channels not in (1, 3):
            raise ConfigError("data.module.channels", channels, [1, 3])
        self.layout = layout
        self.frames, self.stride, self.size, self.channels = frames, stride, size, channels
        self.batch_size, self.num_workers, self.scan_workers = batch_size, num_workers, scan_workers
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self._items: dict[str, list[tuple[VideoEntry, VideoProbe]]] = {}

    def class_names(self) -> list[str]:
        return self.layout.class_names()

    def report_path(self, split: str) -> Path | None:
        return self.report_dir / f"{split}_skips.json" if self.report_dir is not None else None

    def items(self, split: str) -> list[tuple[VideoEntry, VideoProbe]]:
        """The split's usable videos with their probes; bad ones are skipped, counted and reported (once per split)."""
        check_split(split)
        if split not in self._items:
            self._items[split] = self._scan(split)
        return self._items[split]

    def _scan(self, split: str) -> list[tuple[VideoEntry, VideoProbe]]:
        entries = self.layout.entries(split)
        cache = ProbeCache(self.report_dir / "probe_cache.json" if self.report_dir is not None else None)
        probes = probe_all([e.path for e in entries], cache, self.scan_workers, f"probe {self.layout.name} {split}")
        cache.save()
        items, skips = [], []
        for entry, probe in zip(entries, probes, strict=True):
            reason = probe if isinstance(probe, str) else too_short_reason(probe, self.frames, self.stride)
            if reason is None:
                items.append((entry, cast(VideoProbe, probe)))
            else:
                skips.append({"file": str(entry.path), "reason": reason})
        report = self.report_path(split)
        if report is not None:
            atomic_write_json(
                report,
                {
                    "dataset": self.layout.name,
                    "split": split,
                    "root": str(self.layout.root),
                    "list": str(self.layout.list_file(split)),
                    "listed": len(entries),
                    "items": len(items),
                    "skipped": len(skips),
                    "clip_frames_needed": clip_span(self.frames, self.stride),
                    "skips": skips,
                },
            )
        if skips:
            log.warning(
                "%s %s: skipped %d of %d listed videos (missing, unreadable, truncated or too short); list: %s",
                self.layout.name, split, len(skips), len(entries), report or "not written (report_dir is null)",
            )  # fmt: skip
        if entries and not items:
            raise DataNotFoundError(
                f"{self.layout.name} {split}: none of the {len(entries)} videos listed in {self.layout.list_file(split)} "
                f"is usable under {self.layout.root} (see {report}); {self.layout.get_data}"
            )
        return items

    def dataset(self, split: str, augment: bool | None = None) -> VideoClipDataset:
        """Clips of ``split``: ``(uint8 [C, T, size, size], label)``.

        ``augment`` (default: ``split == "train"``) picks a random start per
        read; otherwise every read gives the centre clip (tokenization asks for
        that, so that shards are reproducible).
        """
        augment = split == "train" if augment is None else augment
        return VideoClipDataset(self.items(split), self.frames, self.stride, self.size, self.channels, train=augment)

    def media_info(self) -> dict[str, Any]:
        fps = [probe.fps for _, probe in self.items("train")]
        return {
            "kind": "video",
            "frames": self.frames,
            "stride": self.stride,
            "resolution": [self.size, self.size],
            "fps": round(float(np.median(fps)), 3),  # the train videos' median
            "channels": self.channels,
            "splits": self.layout.split_rule(),
        }

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, SPLITS) if stage is not None else SPLITS:
            self.items(split)


class UCF101DataModule(VideoDataModule):
    """UCF101 (:class:`UCF101Layout`): fold 1-3, ``val`` a seeded hold-out of ``val_size`` train-list entries."""

    def __init__(
        self,
        root: str | Path,
        frames: int = 17,
        stride: int = 1,
        size: int = 128,
        channels: int = 3,
        fold: int = 1,
        split_dir: str | Path | None = None,
        val_size: int = 500,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        report_dir: str | Path | None = None,
        scan_workers: int = 4,
    ) -> None:
        layout = UCF101Layout(root, fold=fold, split_dir=split_dir, val_size=val_size, seed=seed)
        super().__init__(layout, frames, stride, size, channels, batch_size, num_workers, report_dir, scan_workers)


class Kinetics600DataModule(VideoDataModule):
    """Kinetics-600 (:class:`KineticsLayout`): train, validate and test CSVs."""

    def __init__(
        self,
        root: str | Path,
        frames: int = 16,
        stride: int = 1,
        size: int = 128,
        channels: int = 3,
        split_dir: str | Path | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        report_dir: str | Path | None = None,
        scan_workers: int = 4,
    ) -> None:
        layout = KineticsLayout(root, split_dir=split_dir)
        super().__init__(layout, frames, stride, size, channels, batch_size, num_workers, report_dir, scan_workers)
