"""Every option of every config group, and every experiment, composes and builds."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose_config
from magnets.choices import MODEL_SIZES
from magnets.cli import check_decode, check_model, check_policy_fits, check_train_config
from magnets.decoding.schedules import load_schedule
from magnets.errors import ConfigError
from magnets.models.tokenizer import tokenizer_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def test_the_experiment_group_is_served_from_the_experiments_folder(tmp_path):
    """No copy or link in conf/: the search path's config source lists and loads experiments/ itself."""
    assert not (CONF_DIR / "experiment").exists() and "fmnist" in EXPERIMENTS
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=moving_fmnist_fp", f"run_dir={tmp_path}"])
        assert cfg.name == "moving_fmnist_fp" and cfg.task.cond_frames == 5  # the preset and the one it extends
        with pytest.raises(Exception, match=r"Could not find 'experiment/nope'"):
            compose("config", overrides=["experiment=nope"])
        # evaluate and sample take the same selector, a plain key there: it names the run folder.
        evaluate = compose("evaluate", overrides=["experiment=ucf101_b"])
        assert evaluate.name == "ucf101_b" and evaluate.results.endswith("runs/ucf101_b/results.csv")
        assert compose("sample", overrides=["experiment=k600_s"]).name == "k600_s"


# Groups outside the training config's defaults: the primary config they belong to, and whether they are appended (+).
OTHER_PRIMARY = {
    "schedule": ("evaluate", ""),
    "extractor": ("evaluate", ""),
    "geometry": ("bench", ""),
    "ablation": ("config", "+"),
    "sweep": ("evaluate", "+"),
    "decode_policy": ("evaluate", ""),
}
TRAINING_SWEEPS = {"distill"}  # conf/sweep/ presets of `make sweep-train`


def compose_primary(primary: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(primary, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes(group, option, tmp_path):
    primary, prefix = OTHER_PRIMARY.get(group, ("config", ""))
    if group == "sweep" and option in TRAINING_SWEEPS:
        primary = "config"
    overrides = [f"{prefix}{group}={option}"] + ([f"paths.runs={tmp_path}"] if primary != "bench" else [])
    if primary == "config":
        overrides.append(f"run_dir={tmp_path}/run")
    cfg = compose_primary(primary, overrides)
    cfg.hydra.runtime.output_dir = str(tmp_path)  # what a real run sets; run_dir interpolates it
    OmegaConf.resolve(cfg)
    if group == "tokenizer":
        tokenizer_config(cfg.tokenizer.kind, cfg.tokenizer.model)
        assert Path(cfg.tokenizer.dir).parent == tmp_path / "tokenizers"
    if group == "schedule":
        schedule = load_schedule(OmegaConf.to_container(cfg.schedule))
        assert schedule.name == (option if option != "search" else "search_3-3-3-3")  # the template's default cuts
        assert schedule.total_steps in (2, 3, 4, 6, 8, 12, 16)
    if group == "sweep":
        assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper.params
        if primary == "evaluate":  # sample quality in the run's own classifier's features, images or clips
            assert cfg.extractor.name == "domain"
    if group == "decode_policy":  # every preset passes the decode checks and fits the default training model
        model = compose_primary("config", [f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"]).model
        check_decode(cfg.decode)
        check_policy_fits(cfg.decode, list(model.widths), MODEL_SIZES[model.size]["depth"])
    if group == "extractor":
        assert cfg.extractor.name == option and "path" in cfg.extractor
    if group == "ablation":
        assert cfg.distill.mode == ("progressive" if option == "progressive" else "none")
        assert list(cfg.model.widths) == ([int(option.split("_")[1])] if option.startswith("single_") else [8, 4, 2, 1])
        check_train_config(cfg)  # the entry point's checks: a lone width and its validation schedule pass them


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    OmegaConf.resolve(cfg)
    assert cfg.name == experiment
    check_train_config(cfg)  # every value an entry point checks before it starts work


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Exception, match="fmnist_vq"):
        compose_config(["tokenizer=nonexistent"])


@pytest.mark.parametrize("widths", [[8, 4, 2, 1], [8], [2], [4, 1]])
def test_model_widths_any_distinct_divisors(widths):
    check_model({"size": "fmnist", **MODEL_SIZES["fmnist"], "widths": widths})


@pytest.mark.parametrize("widths", [[], [3], [8, 8], [0, 1], [256]])
def test_model_widths_refused_naming_the_valid_ones(widths):
    with pytest.raises(ConfigError, match=r"model\.widths.*distinct positive divisors of dim=128"):
        check_model({"size": "fmnist", **MODEL_SIZES["fmnist"], "widths": widths})


def test_the_registries_hold_exactly_the_listed_choices() -> None:
    """The config checks read names from magnets.choices; the modules that act on them register those names."""
    from magnets import choices
    from magnets.decoding.loop import DECODE_DTYPES
    from magnets.masking import MASK_SCHEDULES
    from magnets.metrics.extractors import EXTRACTORS

    assert tuple(MASK_SCHEDULES) == choices.MASK_SCHEDULES
    assert tuple(EXTRACTORS) == choices.EXTRACTORS
    assert tuple(DECODE_DTYPES) == choices.DECODE_DTYPES


CHECK_WITHOUT_TORCH = """
import sys
from hydra import compose, initialize_config_dir
from magnets.errors import ConfigError
import magnets.bench, magnets.evaluate, magnets.sample, magnets.tokenize, magnets.train
checks = [("config", magnets.train.check_train_config, "seed=abc"), ("config", magnets.tokenize.check_tokenize_config,
          "tokenize.batch_size=0"), ("evaluate", magnets.evaluate.check_config, "samples=0"),
          ("sample", magnets.sample.check_sample_config, "dtype=bogus"), ("bench", magnets.bench.check_bench_config,
          "batch_size=0")]
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    for primary, check, override in checks:
        try:
            check(compose(primary, overrides=[override, "run_dir=/nowhere"] if primary == "config" else [override]))
        except ConfigError as err:
            print(err)
heavy = sorted(name for name in ("torch", "lightning", "timm", "torchvision") if name in sys.modules)
print("heavy:", heavy)
"""


def test_entry_points_report_a_bad_value_before_importing_torch_or_lightning() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", CHECK_WITHOUT_TORCH, str(CONF_DIR)], capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[:5] == [
        "seed='abc' is not valid; valid: a non-negative integer, e.g. 0",
        "tokenize.batch_size=0 is not valid; valid: a positive integer",
        "samples=0 is not valid; valid: a positive integer",
        "dtype='bogus' is not valid; valid: float32, bfloat16, float16",
        "batch_size=0 is not valid; valid: a positive integer",
    ]
    assert lines[5] == "heavy: []"
