"""ILSVRC2012 folders -> token shards: layout, preprocessing, unreadable files, resuming, ranks, the sharded reader."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from magnets.cli import check_tokenize, check_tokenizer_fits_data
from magnets.data import tokenization
from magnets.data.base import UNREADABLE_LABEL, build_datamodule, to_unit_float
from magnets.data.imagenet import ImageNetDataModule, ImageNetLayoutError, center_crop_resize
from magnets.data.shards import (
    ConcatenatedRows,
    ShardError,
    TokenDataModule,
    TokenDataset,
    open_shard,
    read_meta,
    write_shard,
)
from magnets.data.tokenization import process_rank, tokenize_splits
from magnets.errors import ConfigError, DataNotFoundError
from magnets.lit.tokenizer import load_tokenizer
from magnets.models.tokenizer import build_tokenizer
from magnets.pipeline import check_pretokenized

WNIDS = ["n01440764", "n01443537", "n01484850"]
TRAIN_PER_CLASS = 64
VAL_PER_CLASS = 10
SIZES = [(40, 56), (56, 40), (64, 48), (37, 50), (50, 50)]  # (width, height): non-square, both orientations
SIZE = 32  # the crop the tiny tokenizer takes
ITEMS_PER_SHARD = 40
TOKENIZER = {
    "in_channels": 3,
    "image_size": SIZE,
    "channels": [8, 8, 16],
    "num_res_blocks": 1,
    "code_dim": 8,
    "codebook_size": 64,
}


@dataclass
class Ilsvrc:
    root: Path
    corrupt: set[str]  # paths of files PIL cannot decode
    cmyk: set[str]
    grey: set[str]
    val_truth: dict[str, str]  # val file name -> wnid


def picture(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    """A noisy image whose dominant colour depends on the class."""
    width, height = size
    base = np.zeros((height, width, 3), np.float64)
    base[..., label % 3] = 170
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def save_item(path: Path, image: Image.Image, kind: str, rng: np.random.Generator) -> None:
    if kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "grey":
        image.convert("L").save(path, "JPEG", quality=90)
    elif kind == "truncated":
        image.save(path, "JPEG", quality=90)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    else:
        image.save(path, "JPEG", quality=90)


# Which items of a class folder (or of the flat val folder) are special, by position.
SPECIAL = {3: "cmyk", 7: "grey", 11: "truncated", 19: "garbage", 30: "cmyk", 41: "truncated"}


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory: pytest.TempPathFactory) -> Ilsvrc:
    """An ILSVRC2012-layout folder: 3 x 64 train images, 30 flat val images with LOC_val_solution.csv (some bad)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    found = Ilsvrc(root, set(), set(), set(), {})
    kinds = {"truncated": found.corrupt, "garbage": found.corrupt, "cmyk": found.cmyk, "grey": found.grey}
    for label, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            path = root / "train" / wnid / f"{wnid}_{i + 1}.JPEG"
            kind = SPECIAL.get(i, "rgb") if label != 1 else "rgb"  # class 1 has no bad files
            save_item(path, picture(rng, label, SIZES[i % len(SIZES)]), kind, rng)
            kinds.get(kind, set()).add(str(path))
    (root / "val").mkdir()
    for i in range(len(WNIDS) * VAL_PER_CLASS):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        label = (i * 7) % len(WNIDS)
        kind = {4: "grey", 9: "garbage"}.get(i, "rgb")
        save_item(root / "val" / name, picture(rng, label, SIZES[i % len(SIZES)]), kind, rng)
        kinds.get(kind, set()).add(str(root / "val" / name))
        found.val_truth[name] = WNIDS[label]
    with (root / "LOC_val_solution.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, wnid in sorted(found.val_truth.items(), reverse=True):  # any order
            writer.writerow([Path(name).stem, f"{wnid} 10 12 30 40 {wnid} 1 2 3 4"])
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image: not an item")
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TokenizerModule-format checkpoint of an untrained tiny RGB VQ tokenizer (32x32 -> 8x8 tokens of 64 codes)."""
    torch.manual_seed(0)
    model = build_tokenizer("vq2d", TOKENIZER)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"kind": "vq2d", "model": TOKENIZER}, "state_dict": state}, path)
    return path


def datamodule(ilsvrc: Ilsvrc, **kwargs) -> ImageNetDataModule:
    return ImageNetDataModule(ilsvrc.root, image_size=SIZE, batch_size=16, num_workers=0, **kwargs)


def run(ilsvrc: Ilsvrc, checkpoint: Path, out: Path, **kwargs) -> dict[str, Path]:
    args = {"batch_size": 16, "num_workers": 0, "items_per_shard": ITEMS_PER_SHARD, **kwargs}
    return tokenize_splits(checkpoint, datamodule(ilsvrc), "imagenet", out, ["train", "val"], ["train"], **args)


@pytest.fixture(scope="module")
def unbroken(ilsvrc: Ilsvrc, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process tokenization of train (mirrored) and val, 40 source items per shard."""
    out = tmp_path_factory.mktemp("unbroken")
    run(ilsvrc, checkpoint, out)
    return out


def shard_files(split_dir: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(split_dir.glob("shard-*/*.npy"))}


def count_encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch tokenization's tokenizer loading so that every encode call records its batch size."""
    calls: list[int] = []
    load = tokenization.load_tokenizer

    def counting_load(path):
        model = load(path)
        encode = model.encode
        model.encode = lambda x: (calls.append(len(x)), encode(x))[1]
        return model

    monkeypatch.setattr(tokenization, "load_tokenizer", counting_load)
    return calls


def test_splits_become_shards_read_back_as_one_dataset_with_a_report(ilsvrc, checkpoint, unbroken):
    dm = datamodule(ilsvrc)
    train = dm.dataset("train")
    n_train = len(WNIDS) * TRAIN_PER_CLASS
    assert len(train) == n_train  # notes.txt is not an item
    bad_train = {p for p in ilsvrc.corrupt if "/train/" in p}
    readable = n_train - len(bad_train)

    shards = sorted(p.name for p in (unbroken / "train").iterdir() if p.is_dir())
    assert shards == [f"shard-{i:05d}" for i in range(math.ceil(n_train / ITEMS_PER_SHARD))]
    dataset = TokenDataset(unbroken / "train", codebook_size=64, grid=[8, 8])
    assert len(dataset) == 2 * readable and isinstance(dataset.tokens, ConcatenatedRows)
    assert dataset.meta.count == 2 * readable and dataset.meta.num_shards == len(shards) and dataset.meta.shard is None
    assert {entry["path"] for entry in dataset.meta.unreadable} == bad_train

    report = json.loads((unbroken / "train" / "report.json").read_text())
    assert {entry["path"] for entry in report["unreadable"]} == bad_train
    assert all(entry["reason"] for entry in report["unreadable"])
    assert (report["items"], report["read"], report["skipped"]) == (n_train, readable, len(bad_train))
    assert (report["rows"], report["shards"], report["items_per_shard"]) == (2 * readable, len(shards), ITEMS_PER_SHARD)
    val_report = json.loads((unbroken / "val" / "report.json").read_text())
    assert {entry["path"] for entry in val_report["unreadable"]} == {p for p in ilsvrc.corrupt if "/val/" in p}
    assert len(TokenDataset(unbroken / "val")) == val_report["read"] == len(ilsvrc.val_truth) - 1

    # Shard 0: its readable items in order, then their mirrors; labels are the class folders' indices.
    meta0 = json.loads((unbroken / "train" / "shard-00000" / "meta.json").read_text())
    assert meta0["items"] == [0, ITEMS_PER_SHARD] and meta0["split_items"] == n_train and meta0["num_shards"] == len(shards)
    tokens0 = np.load(unbroken / "train" / "shard-00000" / "tokens.npy")
    labels0 = np.load(unbroken / "train" / "shard-00000" / "labels.npy")
    kept = [i for i in range(ITEMS_PER_SHARD) if str(train.path(i)) not in bad_train]
    assert len(tokens0) == 2 * len(kept) and (labels0 == 0).all()

    # CMYK and grey JPEGs are tokenized: their rows are the tokens of their RGB crops (and of the mirrored crops).
    tokenizer = load_tokenizer(checkpoint)
    special = [i for i in range(n_train) if str(train.path(i)) in ilsvrc.cmyk | ilsvrc.grey]
    assert len(special) == len(ilsvrc.cmyk | ilsvrc.grey) - 1  # one grey file is in val
    for i in special:
        x, label = train[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8 and label == train.labels[i]
        with torch.no_grad():
            both = tokenizer.encode(to_unit_float(torch.stack([x, x.flip(-1)]))).flatten(1).numpy()  # [2, 64]
        shard = i // ITEMS_PER_SHARD
        start = shard * ITEMS_PER_SHARD
        kept = [j for j in range(start, min(start + ITEMS_PER_SHARD, n_train)) if str(train.path(j)) not in bad_train]
        tokens = np.load(unbroken / "train" / f"shard-{shard:05d}" / "tokens.npy")
        np.testing.assert_array_equal(tokens[kept.index(i)], both[0])
        np.testing.assert_array_equal(tokens[len(kept) + kept.index(i)], both[1])
        if str(train.path(i)) in ilsvrc.grey:
            assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey -> RGB replicates the channel
        else:
            assert not torch.equal(x[0], x[1])  # CMYK -> RGB keeps the colour

    # The token datamodule reads the sharded splits for training and evaluation.
    tdm = TokenDataModule(unbroken, codebook_size=64, grid=[8, 8], batch_size=8)
    tokens, labels = next(iter(tdm.train_dataloader()))
    assert tokens.shape == (8, 64) and labels.shape == (8,)
    assert sum(len(t) for t, _ in tdm.val_dataloader()) == val_report["read"]


def test_a_killed_run_resumes_with_the_missing_shards_only_and_matches_the_unbroken_one(
    ilsvrc, checkpoint, unbroken, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "tokens"
    write = tokenization.write_shard
    written: list[Path] = []

    class Killed(Exception):
        pass

    def killed_after_two(directory, meta, fill):
        write(directory, meta, fill)
        written.append(Path(directory))
        if len(written) == 2:
            raise Killed

    monkeypatch.setattr(tokenization, "write_shard", killed_after_two)
    with pytest.raises(Killed):
        run(ilsvrc, checkpoint, out)
    with pytest.raises(ShardError, match=r"2 of 5 shards present .*rerun tokenize"):
        TokenDataset(out / "train")
    assert not (out / "train" / "report.json").exists()

    monkeypatch.setattr(tokenization, "write_shard", write)
    calls = count_encoded(monkeypatch)
    with caplog.at_level(logging.INFO, logger="magnets.data.tokenization"):
        run(ilsvrc, checkpoint, out)
    assert "train: 2 of the 5 shards of rank 0/1 are already written; skipping them" in caplog.text
    n_train = len(WNIDS) * TRAIN_PER_CLASS
    train = datamodule(ilsvrc).dataset("train")
    bad_late = sum(1 for i in range(2 * ITEMS_PER_SHARD, n_train) if str(train.path(i)) in ilsvrc.corrupt)
    readable_val = len(ilsvrc.val_truth) - 1
    assert sum(calls) == 2 * (n_train - 2 * ITEMS_PER_SHARD - bad_late) + readable_val  # shards 2-4 (mirrored) and val
    for split in ("train", "val"):
        assert shard_files(out / split) == shard_files(unbroken / split)
    assert json.loads((out / "train" / "report.json").read_text()) == json.loads((unbroken / "train" / "report.json").read_text())

    calls.clear()
    run(ilsvrc, checkpoint, out)  # everything current: nothing encoded, nothing rewritten
    assert calls == []


def test_two_ranks_write_disjoint_shards_that_make_the_single_process_result(ilsvrc, checkpoint, unbroken, tmp_path):
    out = tmp_path / "tokens"
    run(ilsvrc, checkpoint, out, rank=0, world_size=2)
    assert sorted(p.name for p in (out / "train").glob("shard-*")) == ["shard-00000", "shard-00002", "shard-00004"]
    assert (out / "val" / "report.json").is_file()  # val is one shard, rank 0's: complete
    with pytest.raises(ShardError, match=r"3 of 5 shards present \(missing shard-00001, shard-00003\)"):
        open_shard(out / "train")
    run(ilsvrc, checkpoint, out, rank=1, world_size=2, num_workers=2)  # decoded in worker processes: the same bytes
    for split in ("train", "val"):
        assert shard_files(out / split) == shard_files(unbroken / split)
        assert (out / split / "report.json").is_file()  # rank 1 found the split complete
    single, _, _ = open_shard(unbroken / "train")
    shared, _, meta = open_shard(out / "train")
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(single))
    assert meta.count == len(single)


def test_concatenated_rows_index_like_one_array(unbroken):
    tokens, labels, meta = open_shard(unbroken / "train")
    whole = np.concatenate([np.load(p) for p in sorted((unbroken / "train").glob("shard-*/tokens.npy"))])
    assert tokens.shape == whole.shape == (meta.count, 64) and len(tokens) == len(whole)
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(whole), 50)
    for key in (
        5,
        -1,
        slice(30, 130),
        slice(None, None, 7),
        index,
        np.sort(index),
        whole[:, 0] > 10,
        (slice(60, 90), slice(0, 5)),
    ):
        np.testing.assert_array_equal(tokens[key], whole[key])
    np.testing.assert_array_equal(tokens[index, :3], whole[index, :3])
    np.testing.assert_array_equal(
        np.asarray(labels), np.concatenate([np.load(p) for p in sorted((unbroken / "train").glob("shard-*/labels.npy"))])
    )
    with pytest.raises(IndexError):
        tokens[len(whole)]


def test_a_rerun_with_other_shards_replaces_the_old_layouts(ilsvrc, checkpoint, unbroken, tmp_path):
    out = tmp_path / "tokens"
    old_tokens, old_labels, old_meta = open_shard(unbroken / "val")

    def fill(tokens, labels):
        tokens[:], labels[:] = old_tokens, old_labels

    write_shard(out / "val", replace(old_meta, items=None, split_items=None), fill)
    assert read_meta(out / "val").shard is None  # a split written as one shard (e.g. by hand) reads as before
    run(ilsvrc, checkpoint, out)
    assert not (out / "val" / "meta.json").exists() and not (out / "val" / "tokens.npy").exists()  # the old layout is gone
    assert shard_files(out / "val") == shard_files(unbroken / "val")
    run(ilsvrc, checkpoint, out, items_per_shard=100)  # 2 shards replace 5: the surplus ones are removed
    assert sorted(p.name for p in (out / "train").glob("shard-*")) == ["shard-00000", "shard-00001"]
    assert len(TokenDataset(out / "train")) == len(TokenDataset(unbroken / "train"))
    assert json.loads((out / "train" / "report.json").read_text())["items_per_shard"] == 100


def test_preprocessing_resizes_the_short_side_and_crops_the_centre():
    # No resize when the short side is the size: the centre 30 columns of 60.
    stripes = np.zeros((30, 60, 3), np.uint8)
    stripes[:, :20, 0], stripes[:, 20:40, 1], stripes[:, 40:, 2] = 255, 255, 255
    x = center_crop_resize(Image.fromarray(stripes), 30)  # [3, 30, 30]
    assert x.shape == (3, 30, 30) and x.dtype == torch.uint8
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), stripes[:, 15:45])
    # Portrait, 2x down: 40x80 (w x h) -> 20x40 -> rows 10..29; top half black, bottom white.
    halves = np.zeros((80, 40, 3), np.uint8)
    halves[40:] = 255
    y = center_crop_resize(Image.fromarray(halves), 20)
    assert y.shape == (3, 20, 20)
    assert (y[:, :8] < 5).all() and (y[:, 12:] > 250).all() and (y[:, :, 0] == y[:, :, 19]).all()
    # Antialiased: a 1-pixel checkerboard shrunk 4x is mid-grey, not an aliased pattern of extremes.
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    z = center_crop_resize(Image.fromarray(checker).convert("RGB"), 16)
    assert abs(float(z.float().mean()) - 127.5) < 3 and float(z.float().std()) < 3
    # A constant image stays constant.
    flat = center_crop_resize(Image.new("RGB", (77, 51), (10, 200, 30)), 32)
    assert (flat == torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1)).all()


def test_val_labels_in_every_supported_form(ilsvrc, tmp_path):
    expected = datamodule(ilsvrc).items("val")  # LOC_val_solution.csv found in root
    names, labels = expected
    assert [WNIDS[label] for label in labels] == [ilsvrc.val_truth[Path(n).name] for n in names]
    assert names == sorted(names) and len(names) == len(ilsvrc.val_truth)
    by_wnid, by_index = tmp_path / "val_wnid.txt", tmp_path / "val.txt"
    by_wnid.write_text("".join(f"{name} {wnid}\n" for name, wnid in ilsvrc.val_truth.items()))
    by_index.write_text("".join(f"{name} {WNIDS.index(wnid)}\n" for name, wnid in ilsvrc.val_truth.items()))
    for path in (by_wnid, by_index):
        assert datamodule(ilsvrc, val_labels=path).items("val") == expected
    # Class folders: val/<wnid>/*.JPEG need no labels file.
    folders = tmp_path / "folders"
    for name, wnid in ilsvrc.val_truth.items():
        (folders / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (folders / "val" / wnid / name).symlink_to(ilsvrc.root / "val" / name)
    (folders / "train").symlink_to(ilsvrc.root / "train")
    names, labels = ImageNetDataModule(folders, image_size=SIZE).items("val")
    found = sorted((Path(name).name, label) for name, label in zip(names, labels, strict=True))
    assert found == sorted((Path(name).name, label) for name, label in zip(*expected, strict=True))


def test_layout_errors_name_the_file_and_the_fix(ilsvrc, tmp_path):
    with pytest.raises(ConfigError, match=r"data.num_classes=1000 is not valid; valid: 3, the number of class folders"):
        datamodule(ilsvrc, num_classes=1000).items("train")
    with pytest.raises(ConfigError, match=r"ImageNet's test images have no public labels; use val"):
        datamodule(ilsvrc).dataset("test")
    with pytest.raises(DataNotFoundError, match=r"nowhere does not exist; download ILSVRC2012"):
        ImageNetDataModule(tmp_path / "nowhere").items("train")
    with pytest.raises(DataNotFoundError, match=r"missing.csv \(data.module.val_labels\) does not exist"):
        datamodule(ilsvrc, val_labels=tmp_path / "missing.csv").items("val")

    bare = tmp_path / "bare"  # flat val/ without a labels file
    (bare / "val").mkdir(parents=True)
    (bare / "train").symlink_to(ilsvrc.root / "train")
    for name in list(ilsvrc.val_truth)[:3]:
        (bare / "val" / name).symlink_to(ilsvrc.root / "val" / name)
    with pytest.raises(DataNotFoundError, match=r"no labels file was found: set data.module.val_labels"):
        ImageNetDataModule(bare).items("val")
    partial_list = tmp_path / "partial.txt"
    partial_list.write_text("".join(f"{name} {wnid}\n" for name, wnid in list(ilsvrc.val_truth.items())[1:]))
    first = sorted(ilsvrc.val_truth)[0]
    with pytest.raises(ImageNetLayoutError, match=rf"{first} is not listed in .*partial.txt"):
        ImageNetDataModule(bare, val_labels=partial_list).items("val")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text(f"{first} n99999999\n")
    with pytest.raises(ImageNetLayoutError, match=r"unknown.txt:1: 'n99999999' is neither a wnid of train/"):
        ImageNetDataModule(bare, val_labels=unknown).items("val")
    out_of_range = tmp_path / "range.txt"
    out_of_range.write_text(f"{first} 3\n")
    with pytest.raises(ImageNetLayoutError, match=r"range.txt:1: class index 3 is not in 0..2"):
        ImageNetDataModule(bare, val_labels=out_of_range).items("val")


def test_loaders_drop_unreadable_items(ilsvrc):
    dm = datamodule(ilsvrc)
    val = dm.dataset("val")
    marked = [i for i in range(len(val)) if val[i][1] == UNREADABLE_LABEL]
    assert [str(val.path(i)) for i in marked] == sorted(p for p in ilsvrc.corrupt if "/val/" in p)
    assert (val[marked[0]][0] == 0).all()
    why = val.why_unreadable(marked[0])
    assert why["path"] == str(val.path(marked[0])) and why["reason"].startswith("UnidentifiedImageError")  # the garbage file
    batches = list(dm.val_dataloader())
    assert sum(len(x) for x, _ in batches) == len(val) - len(marked)
    assert all((labels >= 0).all() for _, labels in batches)


def test_imagenet_configs_compose_and_check(ilsvrc, tmp_path, monkeypatch):
    cfg = compose_config(["data=imagenet", "tokenizer=imagenet_vqgan", f"paths.data={tmp_path}"])
    check_tokenizer_fits_data(cfg)
    check_tokenize(cfg.tokenize)
    assert cfg.tokenize.items_per_shard == 10000 and cfg.tokenize.rank is None and cfg.tokenize.num_workers is None
    cfg.data.module.root = str(ilsvrc.root)
    cfg.data.num_classes = 3
    dm = build_datamodule(cfg.data)
    assert isinstance(dm, ImageNetDataModule) and dm.media_info()["channels"] == 3 and dm.num_workers == 8
    for key, value, message in (
        ("items_per_shard", 0, r"tokenize.items_per_shard=0 is not valid; valid: a positive integer"),
        ("rank", 2, r"tokenize.world_size=None is not valid"),
        ("num_workers", -1, r"tokenize.num_workers=-1 is not valid"),
    ):
        bad = dict(cfg.tokenize, **{key: value})
        with pytest.raises(ConfigError, match=message):
            check_tokenize(bad)
    with pytest.raises(ConfigError, match=r"tokenize.rank=2 is not valid; valid: an integer in \[0, tokenize.world_size=2\)"):
        check_tokenize(dict(cfg.tokenize, rank=2, world_size=2))
    check_tokenize(dict(cfg.tokenize, rank=1, world_size=2))


def test_process_rank_comes_from_the_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert process_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert process_rank() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_rank() == (1, 2)  # torchrun's before SLURM's
    assert process_rank(0, 1) == (0, 1)  # the config wins
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(
        ConfigError, match=r"tokenize.rank=2 is not valid; valid: an integer in \[0, 2\) \(from RANK/WORLD_SIZE\)"
    ):
        process_rank()


def test_pretokenized_shards_are_still_enough_and_incomplete_ones_are_refused(unbroken, tmp_path):
    cfg = compose_config(["data=imagenet", "tokenizer=imagenet_vqgan", "data.pretokenized=true", f"tokenize.out_dir={unbroken}"])
    check_pretokenized(cfg)
    partial_dir = tmp_path / "tokens"
    for split in ("train", "val"):
        for shard in (unbroken / split).glob("shard-*"):
            if shard.name != "shard-00003":
                (partial_dir / split / shard.name).mkdir(parents=True)
                for f in shard.iterdir():
                    (partial_dir / split / shard.name / f.name).symlink_to(f)
    cfg.tokenize.out_dir = str(partial_dir)
    with pytest.raises(ShardError, match=r"train: 4 of 5 shards present \(missing shard-00003\)"):
        check_pretokenized(cfg)
    assert read_meta(unbroken / "val").count == len(TokenDataset(unbroken / "val"))


def test_a_split_that_cannot_be_read_fails_before_anything_is_encoded(ilsvrc, checkpoint, tmp_path, monkeypatch):
    calls = count_encoded(monkeypatch)
    with pytest.raises(ConfigError, match=r"split='test' is not valid; .*use val"):
        tokenize_splits(checkpoint, datamodule(ilsvrc), "imagenet", tmp_path, ["train", "val", "test"], ["train"])
    assert calls == [] and not (tmp_path / "train").exists()
