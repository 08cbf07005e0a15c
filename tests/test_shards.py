import json

import numpy as np
import pytest
import torch

from magnets.data.shards import (
    SeededTokenBatches,
    ShardError,
    ShardMeta,
    TokenDataModule,
    TokenDataset,
    open_shard,
    write_shard,
)


def make_meta(count=10, grid=(2, 3), codebook_size=512, split="train"):
    return ShardMeta(
        dataset="synthetic",
        split=split,
        count=count,
        grid=list(grid),
        codebook_size=codebook_size,
        tokenizer_checkpoint="/x/tokenizer.ckpt",
        tokenizer_sha256="ab" * 32,
        flip_augmented=False,
        created="2026-01-01T00:00:00+00:00",
    )


def write_random(directory, meta, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, meta.codebook_size, (meta.count, meta.tokens_per_item)).astype(np.uint16)
    labels = rng.integers(0, 10, meta.count)

    def fill(tokens_out, labels_out):
        tokens_out[:] = tokens
        labels_out[:] = labels

    write_shard(directory, meta, fill)
    return tokens, labels


def test_round_trip(tmp_path):
    meta = make_meta(codebook_size=60000)
    tokens, labels = write_random(tmp_path / "train", meta)
    read_tokens, read_labels, read_meta = open_shard(tmp_path / "train", codebook_size=60000, grid=[2, 3])
    assert isinstance(read_tokens, np.memmap) and read_tokens.dtype == np.uint16
    np.testing.assert_array_equal(read_tokens, tokens)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_meta == meta
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["labels.npy", "meta.json", "tokens.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # no temporary left behind


@pytest.mark.parametrize(
    "expected, message",
    [
        ({"codebook_size": 1024}, "codebook_size: shard has 512, expected 1024"),
        ({"grid": [8, 8]}, r"grid: shard has \[2, 3\], expected \[8, 8\]"),
        ({"codebook_size": 1024, "grid": [8, 8]}, "codebook_size.*; grid"),
    ],
)
def test_meta_mismatch_is_refused_naming_the_field(tmp_path, expected, message):
    write_random(tmp_path / "train", make_meta())
    with pytest.raises(ShardError, match=message):
        open_shard(tmp_path / "train", **expected)
    with pytest.raises(ShardError, match=message):
        TokenDataModule(tmp_path, **{"codebook_size": 512, "grid": [2, 3], **expected}).train_dataloader()


def test_tokens_inconsistent_with_meta_are_refused(tmp_path):
    write_random(tmp_path / "train", make_meta())
    meta_path = tmp_path / "train" / "meta.json"
    fields = json.loads(meta_path.read_text())
    fields["count"] = 11
    meta_path.write_text(json.dumps(fields))
    with pytest.raises(ShardError, match=r"tokens.npy is uint16 \[10, 6\], meta.json says uint16 \[11, 6\]"):
        open_shard(tmp_path / "train")


def test_damaged_shard_files_are_refused_naming_the_file_and_the_remedy(tmp_path):
    """Damage after writing, found when the shard opens, not deep inside a training step."""
    shard = tmp_path / "train"
    write_random(shard, make_meta(codebook_size=64))
    remedy = f"delete {shard} and run the tokenize stage again"
    tokens_bytes = (shard / "tokens.npy").read_bytes()

    (shard / "tokens.npy").write_bytes(tokens_bytes[: len(tokens_bytes) - 7])  # cut short
    with pytest.raises(ShardError, match=rf"tokens.npy is unreadable, truncated .*mmap length.*: {remedy}"):
        open_shard(shard)

    labels = np.load(shard / "labels.npy")  # labels survive; tokens get an id past the codebook
    np.save(shard / "tokens.npy", np.where(np.arange(60).reshape(10, 6) == 17, 64, 3).astype(np.uint16))
    with pytest.raises(ShardError, match=rf"tokens.npy holds token id 64, outside the codebook of 64 codes.*: {remedy}"):
        open_shard(shard)
    np.save(shard / "tokens.npy", np.full((10, 6), 63, np.uint16))  # the top id is inside
    open_shard(shard)

    np.save(shard / "labels.npy", np.where(np.arange(10) == 4, -1, labels).astype(np.int64))
    with pytest.raises(ShardError, match=r"labels.npy holds label -1 < 0"):
        open_shard(shard)

    (shard / "labels.npy").unlink()
    with pytest.raises(ShardError, match=rf"labels.npy is missing \(meta.json is there\): {remedy}"):
        open_shard(shard)


def test_labels_beyond_num_classes_are_refused_naming_the_setting(tmp_path):
    write_random(tmp_path / "train", make_meta())  # labels 0..9
    labels = np.load(tmp_path / "train" / "labels.npy")
    top = int(labels.max())
    with pytest.raises(ShardError, match=rf"labels reach {top}, but data.num_classes={top} allows 0..{top - 1}"):
        TokenDataModule(tmp_path, codebook_size=512, grid=[2, 3], batch_size=5, num_classes=top).train_dataloader()
    TokenDataModule(tmp_path, codebook_size=512, grid=[2, 3], batch_size=5, num_classes=top + 1).train_dataloader()
    assert len(TokenDataset(tmp_path / "train", num_classes=top + 1)) == 10


def test_crash_mid_write_leaves_no_shard_and_keeps_the_old_one(tmp_path):
    old_tokens, _ = write_random(tmp_path / "train", make_meta(), seed=0)

    def crashing_fill(tokens_out, labels_out):
        tokens_out[:5] = 1
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "train", make_meta(), crashing_fill)
    tokens, _, _ = open_shard(tmp_path / "train")
    np.testing.assert_array_equal(tokens, old_tokens)  # the complete old shard is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["train"]

    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "val", make_meta(split="val"), crashing_fill)
    assert not (tmp_path / "val").exists()
    with pytest.raises(ShardError, match="meta.json is missing"):
        open_shard(tmp_path / "val")


def test_rewrite_replaces_old_shard(tmp_path):
    write_random(tmp_path / "train", make_meta(count=10), seed=0)
    new_tokens, _ = write_random(tmp_path / "train", make_meta(count=4), seed=1)
    tokens, _, meta = open_shard(tmp_path / "train")
    assert meta.count == 4
    np.testing.assert_array_equal(tokens, new_tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["train"]


def test_token_datamodule_batches(tmp_path):
    for split in ("train", "val", "test"):
        write_random(tmp_path / split, make_meta(count=10, split=split))
    dm = TokenDataModule(tmp_path, codebook_size=512, grid=[2, 3], batch_size=4)
    tokens, labels = next(iter(dm.train_dataloader()))
    assert tokens.shape == (4, 6) and tokens.dtype == torch.int64 and labels.shape == (4,)
    assert sum(len(t) for t, _ in dm.val_dataloader()) == 10


def test_seeded_batches_resume_at_any_step_and_split_across_processes(tmp_path):
    write_random(tmp_path / "train", make_meta(count=24))
    dataset = TokenDataset(tmp_path / "train")

    def first_batches(start, n=5, **kwargs):
        batches = iter(SeededTokenBatches(dataset, batch_size=4, seed=7, start_step=lambda: start, **kwargs))
        return [next(batches) for _ in range(n)]

    unbroken = first_batches(0, n=9)
    resumed = first_batches(4)
    for (a_tokens, a_labels), (b_tokens, b_labels) in zip(unbroken[4:], resumed, strict=True):
        assert torch.equal(a_tokens, b_tokens) and torch.equal(a_labels, b_labels)
    # 6 steps per epoch: every item once per epoch, another order in the next epoch.
    source = SeededTokenBatches(dataset, batch_size=4, seed=7)
    epoch0 = np.concatenate([source.batch_indices(s) for s in range(6)])
    assert sorted(epoch0.tolist()) == list(range(24))
    assert not np.array_equal(source.batch_indices(0), source.batch_indices(6))
    # Two processes: disjoint halves of each global batch of 2 x 4.
    ranks = [SeededTokenBatches(dataset, batch_size=4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0].batch_indices(0)) & set(ranks[1].batch_indices(0))
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        SeededTokenBatches(dataset, batch_size=16, seed=0, world_size=2)


def test_write_refuses_codebooks_beyond_uint16(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_random(tmp_path / "train", make_meta(codebook_size=70000))
