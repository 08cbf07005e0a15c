import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import idx_payload
from magnets.data import fashion_mnist
from magnets.data.base import build_datamodule
from magnets.data.fashion_mnist import ChecksumError, DataNotFoundError
from magnets.data.images import FashionMNISTDataModule, pad_to
from magnets.errors import ConfigError


def test_parse_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = fashion_mnist.parse_idx(idx_payload(array))
    assert parsed.shape == (2, 3, 4) and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, array)


def test_parse_idx_big_endian_int32():
    values = np.array([1, -2, 70000], dtype=">i4")
    payload = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes()
    np.testing.assert_array_equal(fashion_mnist.parse_idx(payload), [1, -2, 70000])


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01", "bad magic"),
        (bytes([0, 0, 0x07, 1]) + (1).to_bytes(4, "big") + b"\x00", "unknown idx type"),
        (bytes([0, 0, 0x08, 2]) + (3).to_bytes(4, "big"), "truncated idx header"),
        (bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + b"\x00" * 4, "needs 5"),
    ],
)
def test_parse_idx_rejects_malformed(payload, message):
    with pytest.raises(ValueError, match=message):
        fashion_mnist.parse_idx(payload, "x.idx")


def test_load_split_reads_synthetic_files(fake_fmnist):
    images, labels = fashion_mnist.load_split("train", fake_fmnist, search_debian=False)
    assert images.shape == (120, 28, 28) and labels.shape == (120,)
    with pytest.raises(ValueError, match=r"unknown Fashion-MNIST split 'validation'; valid: \['test', 'train'\]"):
        fashion_mnist.load_split("validation", fake_fmnist, search_debian=False)


def test_checksum_failure_names_file_and_expected_sum(fake_fmnist):
    path = fake_fmnist / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:  # one flipped pixel: still a valid idx file, wrong payload
        f.write(payload[:-1] + bytes([payload[-1] ^ 0xFF]))
    expected = fashion_mnist.PAYLOAD_SHA256["train-images-idx3-ubyte"]
    with pytest.raises(ChecksumError) as err:
        fashion_mnist.load_split("train", fake_fmnist, search_debian=False)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_truncated_gzip_is_a_clear_error(fake_fmnist):
    path = fake_fmnist / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ChecksumError, match="cannot be read"):
        fashion_mnist.load_split("test", fake_fmnist, search_debian=False)


def test_missing_data_message_names_three_ways(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        fashion_mnist.load_split("train", tmp_path / "empty", base_url="file:///nonexistent/", search_debian=False)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message
    assert str(tmp_path / "empty") in message  # 1. the configured directory
    assert "apt-get install dataset-fashion-mnist" in message  # 2. Debian
    assert fashion_mnist.OFFICIAL_URL in message  # 3. download
    assert "data.module.root=DIR" in message and "data.root" not in message  # the key a user sets
    assert str(fashion_mnist.DEBIAN_DIR) not in message  # search_debian=false: not searched, not claimed
    assert len(message.splitlines()) == 1


def test_download_fills_the_configured_directory(fake_fmnist, tmp_path):
    root = tmp_path / "downloaded"
    images, labels = fashion_mnist.load_split("test", root, base_url=f"file://{fake_fmnist}/", search_debian=False)
    assert images.shape == (40, 28, 28)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{name}.gz" for name in fashion_mnist.PAYLOAD_SHA256)


def test_uncompressed_files_are_found(fake_fmnist):
    for gz in fake_fmnist.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    images, _ = fashion_mnist.load_split("test", fake_fmnist, search_debian=False)
    assert images.shape == (40, 28, 28)


def test_pad_to_centres_and_validates():
    padded = pad_to(np.full((2, 28, 28), 7, dtype=np.uint8), 32)
    assert padded.shape == (2, 1, 32, 32)
    assert padded[:, :, 2:30, 2:30].min() == 7 and padded.sum() == 2 * 28 * 28 * 7
    with pytest.raises(ValueError, match="even margin"):
        pad_to(np.zeros((1, 28, 28), dtype=np.uint8), 31)


def test_datamodule_split_is_deterministic_and_disjoint(fake_fmnist):
    def make(seed):
        return FashionMNISTDataModule(fake_fmnist, val_size=20, split_seed=seed, search_debian=False)

    a, b, c = make(0), make(0), make(1)
    np.testing.assert_array_equal(a.split_arrays("val")[0], b.split_arrays("val")[0])
    assert not np.array_equal(a.split_arrays("val")[0], c.split_arrays("val")[0])
    assert len(a.split_arrays("train")[0]) == 100 and len(a.split_arrays("test")[0]) == 40
    images, labels = next(iter(a.val_dataloader()))
    assert images.shape == (20, 1, 32, 32) and images.dtype == torch.uint8  # the media seam serves uint8
    splits = {"val_size": 20, "split_seed": 0, "subset": None}
    assert a.media_info() == {"kind": "image", "resolution": [32, 32], "channels": 1, "splits": splits}
    with pytest.raises(ValueError, match=r"split='dev' is not valid; valid: train, val, test"):
        a.split_arrays("dev")


def test_build_datamodule_instantiates_the_target_and_names_a_bad_one(fake_fmnist, tmp_path):
    arguments = {"root": str(fake_fmnist), "val_size": 20, "search_debian": False}
    built = build_datamodule(
        {"name": "fmnist", "module": {"_target_": "magnets.data.images.FashionMNISTDataModule", **arguments}}
    )
    assert type(built).__name__ == "FashionMNISTDataModule" and len(built.split_arrays("val")[0]) == 20
    # A config saved before data.module had a _target_ (an older checkpoint's) names its class by data.name.
    assert type(build_datamodule({"name": "fmnist", "module": arguments})).__name__ == "FashionMNISTDataModule"
    valid = "a media datamodule class taking data.module's other keys, e.g. magnets.data.images.FashionMNISTDataModule"
    with pytest.raises(
        ConfigError,
        match=rf"^data.module._target_='magnets.data.images.MNIST' is not valid; valid: {valid}.* \(no such class to import\)$",
    ):
        build_datamodule({"name": "mnist", "module": {"_target_": "magnets.data.images.MNIST", "root": str(tmp_path)}})
    with pytest.raises(
        ConfigError,
        match=r"^data.module._target_='magnets.data.images.FashionMNISTDataModule' .*TypeError: .*keyword argument 'resolution'",
    ):
        build_datamodule(
            {"name": "fmnist", "module": {"_target_": "magnets.data.images.FashionMNISTDataModule", "resolution": 3}}
        )
    with pytest.raises(ConfigError, match=r"^data.module._target_=None is not valid"):
        build_datamodule({"name": "mnist", "module": {"root": str(tmp_path)}})


def test_the_config_check_wants_a_datamodule_target() -> None:
    from magnets.cli import check_data

    data = {"name": "fmnist", "pretokenized": False, "num_classes": 10, "module": {"_target_": "not a path"}}
    with pytest.raises(ConfigError, match=r"^data.module._target_='not a path' is not valid; valid: the dotted path"):
        check_data(data)
    check_data(data | {"module": {"_target_": "magnets.data.images.FashionMNISTDataModule"}})
    check_data(data | {"pretokenized": True, "module": None})  # pre-tokenized data have no datamodule


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(tmp_path):
    dm = FashionMNISTDataModule(tmp_path / "none", val_size=5000)
    sizes = {split: len(dm.split_arrays(split)[0]) for split in ("train", "val", "test")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    labels = dm.split_arrays("test")[1]
    assert np.bincount(labels).tolist() == [1000] * 10
    assert Path(fashion_mnist.find_file("t10k-labels-idx1-ubyte", [fashion_mnist.DEBIAN_DIR])).suffix == ".gz"
