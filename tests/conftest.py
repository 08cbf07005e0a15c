"""Shared fixtures: synthetic Fashion-MNIST files and composition of the real Hydra configs."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from magnets.data import fashion_mnist

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def idx_payload(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images of a bright rectangle whose size depends on the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        half = 3 + int(label)
        images[i, 14 - half : 14 + half, 14 - half // 2 : 14 + half // 2] = 200
    images = np.clip(images + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture
def fake_fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of synthetic Fashion-MNIST idx.gz files (120 train, 40 test) whose checksums are the expected ones."""
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    checksums = {}
    for split, n, seed in (("train", 120, 0), ("test", 40, 1)):
        images, labels = synthetic_split(n, seed)
        for name, array in zip(fashion_mnist.SPLIT_FILES[split], (images, labels), strict=True):
            payload = idx_payload(array)
            checksums[name] = hashlib.sha256(payload).hexdigest()
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(payload)
    monkeypatch.setattr(fashion_mnist, "PAYLOAD_SHA256", checksums)
    return root


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def tiny_overrides(fake_fmnist: Path, runs: Path) -> list[str]:
    """The overrides of the real default experiment shrunk to seconds: synthetic data, tiny tokenizer and model, outputs
    in ``runs`` (the run folder is Hydra's unless a ``run_dir=`` is added)."""
    return [
        "experiment=fmnist",
        "tokenizer=tiny",
        "tokenizer_eval.enabled=false",  # the rFID floor costs seconds of Inception; test_reconstruction.py covers it
        f"paths.runs={runs}",
        f"data.module.root={fake_fmnist}",
        "data.module.search_debian=false",
        "data.module.download_url=file:///nonexistent/",
        "data.module.val_size=20",
        "data.module.batch_size=16",
        "tokenize.batch_size=32",
        "progress_refresh_rate=0",
        "model=tiny",
        "maskgit.batch_size=16",
        "maskgit.checkpoint_every=2",
        "maskgit.trainer.max_steps=4",
        "maskgit.trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "maskgit.module.warmup_steps=1",
        "classifier.epochs=1",
        "sample_validation.samples=20",
        "sample_validation.batch_size=20",
    ]


@pytest.fixture
def tiny_cfg(fake_fmnist: Path, tmp_path: Path) -> DictConfig:
    """The real default experiment, shrunk (:func:`tiny_overrides`), its run folder ``<tmp_path>/runs/fmnist/run1``."""
    runs = tmp_path / "runs"
    return compose_config([*tiny_overrides(fake_fmnist, runs), f"run_dir={runs / 'fmnist' / 'run1'}"])


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU flash-attention kernel (which it counts as 0) with SDPA's formula."""
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False, custom_mapping={cpu_attention: attention_flops})


# The end-to-end tests: they train a tiny run (tiny_cfg), execute the notebook, launch processes or read generated
# videos. `make test-fast` (pytest -m "not slow and not e2e") leaves them out: the unit tier, under a minute.
E2E_FIXTURES = {"tiny_cfg", "executed", "seeded", "trained_video_run", "video_run"}
E2E_MODULES = {"test_notebook", "test_cluster", "test_video_pipeline", "test_imagenet_pipeline", "test_train",
               "test_seeds", "test_schedule_search", "test_data_check", "test_video_generation", "test_fid_protocol",
               "test_reconstruction", "test_sample", "test_seams", "test_video_moving_fmnist"}  # fmt: skip
# Integration tests in otherwise unit modules, each seconds long: they launch processes (DDP, parallel appends, entry
# points), compile with torch.compile, run a model-sized network or compose every config option.
E2E_TESTS = {"test_two_process_ddp_run_keeps_ranks_identical", "test_compiled_tokens_to_logits_decode_the_same_tokens",
             "test_parallel_appends_keep_one_header_and_every_row", "test_every_group_option_composes",
             "test_an_unwritable_runs_folder_ends_in_one_line_before_hydra_makes_it",
             "test_compiled_width_losses_equal_the_eager_ones", "test_gpu_check_runs_every_part_and_writes_its_table_on_the_cpu",
             "test_default_model_encodes_256_images_to_16x16_codes_and_back",
             "test_video_classifier_trains_round_trips_and_extracts",
             "test_bench_at_video_geometry_writes_the_model_b_flop_table_of_both_tasks",
             "test_real_fmnist_fid_classifier_features", "test_two_runs_started_in_one_second_get_two_folders",
              "test_two_trainings_started_together_get_two_folders_and_keep_both_checkpoints"}  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        name = getattr(item, "originalname", item.name)  # without the parameters
        if module in E2E_MODULES or name in E2E_TESTS or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
