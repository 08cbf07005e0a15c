"""Atomic file writes and file hashes: the one home of both.

A reader never sees a half-written output: :func:`atomic_write` writes to a
temporary name in the target's directory and renames it into place only when
the write returned (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)``, then rename ``tmp_path`` to ``path``; the temporary file is removed on failure.

    The temporary name keeps ``path``'s suffix, so writers that pick a format
    by extension (images, ``np.savez``) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # on disk before the rename, so a crash cannot leave an empty file under `path`
        os.chmod(tmp, 0o644)  # mkstemp creates it private; outputs are for everyone who can read the folder
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered while its size and mtime stay the same."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def unwritable_reason(path: str | Path, is_dir: bool = False) -> str | None:
    """Why an output at ``path`` (a file, or a folder with ``is_dir``) could not be written, or None if it can.

    Tried, not guessed from permission bits (root passes those everywhere, and
    ``/proc`` refuses anyway): the folder is created if missing (it would be at
    the first write) and a temporary file is made in it and removed.
    """
    folder = Path(path) if is_dir else Path(path).parent
    if Path(path).is_dir() and not is_dir:
        return f"{path} is a folder, not a file"
    existing = next((place for place in (folder, *folder.parents) if place.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"{err.strerror or err} ({err.filename or folder})"
    return None
