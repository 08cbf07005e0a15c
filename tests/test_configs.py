"""Every option of every config group, and every experiment, composes and builds."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose_config
from magnets.models.vq import VQConfig

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def test_experiment_group_is_the_experiments_folder():
    assert (CONF_DIR / "experiment").resolve() == (REPO / "experiments").resolve()
    assert "fmnist" in EXPERIMENTS


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    OmegaConf.resolve(cfg)
    if group == "tokenizer":
        VQConfig(**cfg.tokenizer.model)
        assert Path(cfg.tokenizer.dir).parent == tmp_path / "tokenizers"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    OmegaConf.resolve(cfg)
    assert cfg.name == experiment
    VQConfig(**cfg.tokenizer.model)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Exception, match="fmnist_vq"):
        compose_config(["tokenizer=nonexistent"])
