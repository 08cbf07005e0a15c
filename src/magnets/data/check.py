"""Dataset check: decode every file of every split once; count items, summarise them, list every bad file.

    python -m magnets.data.check experiment=<name> [data.root=DIR]

Prints a summary and writes it as JSON to ``${paths.runs}/data_check/<data.name>.json``:
items per split, classes, frame count / fps / resolution ranges, and every
missing, unreadable, truncated or too-short file with its reason. Bad files
are findings, not failures: the exit status is 0. A dataset that is not
there at all (no root, no split lists) is one line on stderr and status 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from magnets.choices import SPLITS
from magnets.cli import run_entry
from magnets.data.base import build_datamodule
from magnets.data.video import (
    DECODE_ERRORS,
    BadVideo,
    VideoDataModule,
    VideoProbe,
    clip_span,
    open_video,
    probe_video,
    too_short_reason,
)
from magnets.errors import ConfigError
from magnets.files import atomic_write_json

DECODE_CHUNK = 64  # frames decoded per call: bounds memory on long videos


def decode_every_frame(path: Path, frames: int) -> None:
    """Decode frames ``0 .. frames - 1`` of ``path`` with decord; raise :class:`BadVideo` at the first failure."""
    try:
        with open_video(path) as reader:
            for start in range(0, frames, DECODE_CHUNK):
                reader.get_batch(list(range(start, min(frames, start + DECODE_CHUNK))))
    except DECODE_ERRORS as err:
        raise BadVideo(f"unreadable: decoding failed ({err})") from err


def check_file(path: Path, frames: int, stride: int) -> VideoProbe | str:
    """The file's probe when every frame decodes and a clip fits, else the reason it is bad."""
    try:
        probe = probe_video(path)
        decode_every_frame(path, probe.frames)
    except BadVideo as err:
        return str(err)
    return too_short_reason(probe, frames, stride) or probe


def summarize(values: Iterable[float]) -> dict[str, float] | None:
    """``{"min", "median", "max"}`` of ``values``; None when there are none."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return None
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def check_dataset(datamodule: VideoDataModule) -> dict[str, Any]:
    """Decode every listed file of every split (a thread pool of ``scan_workers``): the report as a dict."""
    layout = datamodule.layout
    class_names = layout.class_names()
    report: dict[str, Any] = {
        "dataset": layout.name,
        "root": str(layout.root),
        "classes": len(class_names),
        "class_names": class_names,
        "clip": {
            "frames": datamodule.frames,
            "stride": datamodule.stride,
            "needs": clip_span(datamodule.frames, datamodule.stride),
        },
        "splits": {},
        "bad_files": [],
    }
    for split in SPLITS:
        entries = layout.entries(split)
        with ThreadPoolExecutor(max_workers=max(1, datamodule.scan_workers)) as pool:
            results: Iterable[VideoProbe | str] = pool.map(
                lambda e: check_file(e.path, datamodule.frames, datamodule.stride), entries
            )
            results = list(tqdm(results, total=len(entries), desc=f"check {split}", unit="file", disable=None))
        good = [(entry, r) for entry, r in zip(entries, results, strict=True) if isinstance(r, VideoProbe)]
        bad = [
            {"split": split, "file": str(e.path), "reason": r}
            for e, r in zip(entries, results, strict=True)
            if isinstance(r, str)
        ]
        report["bad_files"].extend(bad)
        report["splits"][split] = {
            "list": str(layout.list_file(split)),
            "listed": len(entries),
            "items": len(good),
            "bad": len(bad),
            "classes_present": len({entry.label for entry, _ in good}),
            "frames": summarize(p.frames for _, p in good),
            "fps": summarize(p.fps for _, p in good),
            "height": summarize(p.height for _, p in good),
            "width": summarize(p.width for _, p in good),
        }
    return report


def _range(stats: dict[str, float] | None, digits: int = 0) -> str:
    if stats is None:
        return "-"
    if stats["min"] == stats["max"]:
        return f"{stats['min']:.{digits}f}"
    return f"{stats['min']:.{digits}f}-{stats['max']:.{digits}f} (median {stats['median']:.{digits}f})"


def format_report(report: dict[str, Any], path: Path) -> str:
    """The report as the lines the command prints."""
    clip = report["clip"]
    lines = [
        f"{report['dataset']} at {report['root']}: {report['classes']} classes; "
        f"a clip of {clip['frames']} frames at stride {clip['stride']} needs {clip['needs']}"
    ]
    for split, s in report["splits"].items():
        lines.append(
            f"  {split:5s} {s['items']} of {s['listed']} usable ({s['bad']} bad), {s['classes_present']} classes; "
            f"frames {_range(s['frames'])}, fps {_range(s['fps'], 2)}, height {_range(s['height'])}, width {_range(s['width'])}"
        )
    lines.append(f"bad files: {len(report['bad_files'])}")
    lines += [f"  {bad['split']:5s} {bad['file']}: {bad['reason']}" for bad in report["bad_files"]]
    lines.append(f"report: {path}")
    return "\n".join(lines)


def run_check(cfg: DictConfig) -> Path:
    """Check the dataset of ``cfg.data``; print the summary, write it to ``${paths.runs}/data_check/<name>.json``."""
    if cfg.data.get("kind") != "video":
        raise ConfigError("data", cfg.data.name, "a video dataset (data=ucf101, kinetics600 or moving_fmnist)")
    datamodule = build_datamodule(cfg.data)
    assert isinstance(datamodule, VideoDataModule), type(datamodule)
    datamodule.prepare_data()  # generates embedded data when it is missing
    report = check_dataset(datamodule)
    path = atomic_write_json(Path(cfg.paths.runs) / "data_check" / f"{cfg.data.name}.json", report)
    print(format_report(report, path))
    return path


@hydra.main(config_path="../../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entry(run_check, cfg)


if __name__ == "__main__":
    main()
