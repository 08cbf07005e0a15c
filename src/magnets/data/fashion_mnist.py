"""Fashion-MNIST: idx(.gz) reader with payload checksums, lookup and download.

Files are looked for in a configured directory, then in the Debian package's
directory, then downloaded from the official source into the configured
directory. Every file is verified by the sha256 of its *decompressed*
payload, which is the same whichever source recompressed the ``.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from magnets.errors import DataNotFoundError
from magnets.files import atomic_write

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# sha256 of the decompressed idx payload of each file.
PAYLOAD_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# idx type byte -> numpy dtype (big-endian where it matters).
_IDX_DTYPES: dict[int, type[np.generic] | str] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class ChecksumError(ValueError):
    """A dataset file's payload does not have the expected sha256."""


def parse_idx(payload: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an idx payload (already decompressed) into an array.

    Layout: two zero bytes, a type byte, a dimension count, one big-endian
    uint32 per dimension, then the data.
    """
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise ValueError(f"{source}: not an idx file (bad magic number {payload[:4].hex()})")
    type_code, ndim = payload[2], payload[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown idx type byte 0x{type_code:02x}; valid: {sorted(_IDX_DTYPES)}")
    header_end = 4 + 4 * ndim
    if len(payload) < header_end:
        raise ValueError(f"{source}: truncated idx header")
    shape = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) - header_end != expected:
        raise ValueError(f"{source}: idx payload holds {len(payload) - header_end} bytes, its header {shape} needs {expected}")
    return np.frombuffer(payload, dtype=dtype, offset=header_end).reshape(shape)


def read_payload(path: Path) -> bytes:
    """Bytes of an idx file, decompressed if it ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # gzip raises these on truncated or corrupt streams
        raise ChecksumError(f"{path}: cannot be read ({err}); delete it and fetch it again") from err


def verify_payload(payload: bytes, name: str, path: Path) -> None:
    expected = PAYLOAD_SHA256[name]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 of the decompressed payload is {actual}, expected {expected} for {name}. "
            "The file is corrupt or truncated: delete it and fetch it again."
        )


def find_file(name: str, search_dirs: list[Path]) -> Path | None:
    """First ``name`` or ``name.gz`` in ``search_dirs``."""
    for directory in search_dirs:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download_file(name: str, directory: Path, base_url: str = OFFICIAL_URL, timeout: float = 30.0) -> Path:
    """Download ``name.gz`` into ``directory`` atomically; raise ``OSError`` when offline."""

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(base_url + f"{name}.gz", timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)

    return atomic_write(directory / f"{name}.gz", fetch)


def missing_data_message(searched: list[Path], root: Path, missing: list[str], base_url: str, download_error: str) -> str:
    """One line: which files, every folder searched (only those), the download tried, and the three ways to get them."""
    looked = " and ".join(str(folder) for folder in searched)
    return (
        f"Fashion-MNIST files not found: {', '.join(missing)}; looked in {looked}, and the download from {base_url} "
        f"failed ({download_error}). Put the four idx files (.gz or not) in {root} (or set data.module.root=DIR), "
        "install Debian's package (apt-get install dataset-fashion-mnist; make setup does this as root), "
        f"or go online and rerun: they are downloaded from {OFFICIAL_URL} into data.module.root"
    )


def locate(root: Path, base_url: str = OFFICIAL_URL, search_debian: bool = True) -> dict[str, Path]:
    """Path of every Fashion-MNIST file: ``root``, then Debian's directory, then download."""
    search_dirs = [root] + ([DEBIAN_DIR] if search_debian else [])
    found = {name: find_file(name, search_dirs) for name in PAYLOAD_SHA256}
    missing = [name for name, path in found.items() if path is None]
    for name in missing:
        try:
            found[name] = download_file(name, root, base_url)
        except (OSError, urllib.error.URLError) as err:
            raise DataNotFoundError(missing_data_message(search_dirs, root, missing, base_url, str(err))) from err
    return found  # type: ignore[return-value]


def load_split(split: str, root: Path, base_url: str = OFFICIAL_URL, search_debian: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` uint8 of ``train`` or ``test``, checksum-verified."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: {sorted(SPLIT_FILES)}")
    paths = locate(Path(root), base_url, search_debian)
    arrays = []
    for name in SPLIT_FILES[split]:
        payload = read_payload(paths[name])
        verify_payload(payload, name, paths[name])
        arrays.append(parse_idx(payload, str(paths[name])))
    images, labels = arrays
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels
