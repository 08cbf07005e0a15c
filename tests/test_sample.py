"""python -m magnets.sample on a tiny trained run: grid, tokens, GFLOPs; clear errors on bad input."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import CONF_DIR
from magnets.errors import ConfigError, MismatchError
from magnets.models.tokenizer import build_tokenizer
from magnets.pipeline import train
from magnets.sample import sample


def sample_config(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=overrides)


def test_sample_writes_a_class_grid_and_tokens_from_the_newest_checkpoint(tiny_cfg, tmp_path):
    train(tiny_cfg)
    base = [f"paths.runs={tiny_cfg.paths.runs}", "name=fmnist", "samples_per_class=3", "batch_size=7"]
    out = sample(sample_config([*base, "schedule=magnets_3333", f"out_dir={tmp_path / 'cached'}"]))
    grid = np.asarray(Image.open(tmp_path / "cached" / "grid.png"))
    assert grid.shape[:2] == (10 * (32 + 2) + 2, 3 * (32 + 2) + 2)  # one row per class, one column per sample
    saved = np.load(tmp_path / "cached" / "samples.npz")
    assert saved["tokens"].shape == (30, 64) and (saved["tokens"] < 64).all()
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 3))
    summary = json.loads(str(saved["summary"]))
    assert summary["schedule"] == "magnets_3333" and summary["cache"] == "refresh_on_switch"
    assert summary["flops_ratio_vs_baseline"] > 1.5

    baseline = sample(sample_config([*base, "schedule=maskgit_12", "decode.cache=none", f"out_dir={tmp_path / 'base'}"]))
    assert baseline["flops_ratio_vs_baseline"] == pytest.approx(1.0)
    assert out["gflops_per_sample"] < baseline["gflops_per_sample"]
    again = sample(sample_config([*base, "schedule=magnets_3333", f"out_dir={tmp_path / 'again'}"]))
    assert (again["tokens"] == out["tokens"]).all()  # same seed, same samples

    with pytest.raises(ConfigError, match=r"classes=\[12\] is not valid; valid: .*ids in 0\.\.9"):
        sample(sample_config([*base, "classes=[1,12]"]))
    with pytest.raises(ConfigError, match=r"schedule.widths=\[3, 1\] is not valid; valid: widths of the model: \[8, 4, 2, 1\]$"):
        sample(sample_config([*base, "schedule.widths=[3,1]", "schedule.steps=[6,6]"]))

    # Another tokenizer than the run's: a larger codebook (silently wrong pictures) or a smaller one (ids past its
    # embedding) is refused naming both; each checkpoint given in the other's place is named for what it is.
    tokenizer_ckpt = Path(tiny_cfg.tokenizer.dir) / "tokenizer.ckpt"
    saved = torch.load(tokenizer_ckpt, weights_only=False)
    for codes in (32, 128):
        other = copy.deepcopy(saved)
        other["hyper_parameters"]["model"]["codebook_size"] = codes
        module = build_tokenizer(other["hyper_parameters"].get("kind", "vq2d"), other["hyper_parameters"]["model"])
        other["state_dict"] = {f"model.{k}": v for k, v in module.state_dict().items()}
        torch.save(other, tmp_path / f"tokenizer_{codes}.ckpt")
        with pytest.raises(MismatchError, match=rf"tokenizer_{codes}.ckpt \({codes} codes, grid \[8, 8\]\) does not fit "
                           r"the transformer .*last.ckpt \(64 codes, grid \[8, 8\]\)"):  # fmt: skip
            sample(sample_config([*base, f"tokenizer_checkpoint={tmp_path / f'tokenizer_{codes}.ckpt'}"]))
    with pytest.raises(MismatchError, match=r"is not a nested MaskGIT checkpoint.*it is a tokenizer checkpoint"):
        sample(sample_config([*base, f"checkpoint={tokenizer_ckpt}"]))
    transformer_ckpt = next(Path(tiny_cfg.paths.runs).glob("fmnist/*/checkpoints/last.ckpt"))
    with pytest.raises(MismatchError, match=r"is not a tokenizer checkpoint: it is a nested MaskGIT one"):
        sample(sample_config([*base, f"tokenizer_checkpoint={transformer_ckpt}"]))


def test_sample_names_what_is_missing(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"checkpoint='last' is not valid.*/nothing/\*/checkpoints/last.ckpt exists as a whole checkpoint .*\(train first",
    ):
        sample(sample_config([f"paths.runs={tmp_path}", "experiment=nothing"]))
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sample(sample_config([f"checkpoint={tmp_path / 'junk.ckpt'}"]))
