"""Bad input a new user gives: each refused in one line naming the value and what would be valid, before any work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose_config
from magnets.bench import check_bench_config
from magnets.cli import check_sample_config, check_train_config
from magnets.errors import ConfigError
from magnets.evaluate import check_config as check_evaluate
from magnets.files import unwritable_reason


def compose_primary(primary: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(primary, overrides=overrides)


def a_file(tmp_path: Path) -> Path:
    """A regular file: nothing can be created under it, whoever runs the test (root included)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def test_unwritable_reason_tries_the_place_instead_of_reading_permission_bits(tmp_path) -> None:
    blocker = a_file(tmp_path)
    assert unwritable_reason(tmp_path / "new" / "deeper" / "out.json") is None
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())  # nothing left
    assert unwritable_reason(blocker / "out.json") == f"{blocker} is a file, not a folder"
    assert unwritable_reason(blocker / "runs" / "x", is_dir=True) == f"{blocker} is a file, not a folder"
    assert unwritable_reason(tmp_path, is_dir=False) == f"{tmp_path} is a folder, not a file"


@pytest.mark.parametrize("seed", ["abc", -1, 1.5, True])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused(tmp_path, seed) -> None:
    cfg = compose_config([f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    cfg.seed = seed
    with pytest.raises(ConfigError, match=r"^seed=.* is not valid; valid: a non-negative integer"):
        check_train_config(cfg)
    evaluate = compose_primary("evaluate", [f"paths.runs={tmp_path}"])
    evaluate.seed = seed
    with pytest.raises(ConfigError, match=r"^seed=.* is not valid"):
        check_evaluate(evaluate)


def test_a_gpu_trainer_without_cuda_is_refused_naming_the_cpu_trainer(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config(["trainer=gpu", f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"^trainer.accelerator='gpu' is not valid; valid: cpu or auto: no CUDA.*trainer=cpu"):
        check_train_config(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_train_config(cfg)  # where CUDA is, the same config passes


def test_unwritable_outputs_are_refused_before_any_work(tmp_path) -> None:
    blocker = a_file(tmp_path)
    evaluate = compose_primary("evaluate", [f"paths.runs={tmp_path}", f"results={blocker}/results.csv"])
    with pytest.raises(ConfigError, match=r"^results='.*a_file/results.csv' is not valid; valid: a writable file path"):
        check_evaluate(evaluate)
    evaluate = compose_primary("evaluate", [f"paths.runs={tmp_path}", f"export_npz={blocker}/samples.npz"])
    with pytest.raises(ConfigError, match=r"^export_npz="):
        check_evaluate(evaluate)
    sample = compose_primary("sample", [f"paths.runs={tmp_path}", f"out_dir={blocker}/grids"])
    with pytest.raises(ConfigError, match=r"^out_dir='.*a_file/grids' is not valid; valid: a writable folder"):
        check_sample_config(sample)
    bench = compose_primary("bench", [f"out={blocker}/bench.json"])
    with pytest.raises(ConfigError, match=r"^out='.*' is not valid; valid: a writable file path"):
        check_bench_config(bench)
    bench.out = str(tmp_path / "bench" / "decode.json")
    check_bench_config(bench)


@pytest.mark.parametrize("module", ["magnets.train", "magnets.evaluate"])
def test_an_unwritable_runs_folder_ends_in_one_line_before_hydra_makes_it(tmp_path, module) -> None:
    runs = a_file(tmp_path) / "runs"
    result = subprocess.run(
        [sys.executable, "-m", module, f"paths.runs={runs}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    assert lines[0].startswith(f"error: paths.runs='{runs}': the run folder {runs}/") and "valid: a writable folder" in lines[0]


def test_the_sweep_folder_is_checked_too(tmp_path) -> None:
    from magnets.hydra_callbacks import CheckOutputs

    cfg = OmegaConf.create({"paths": {"runs": str(a_file(tmp_path))}, "hydra": {"sweep": {"dir": "${paths.runs}/sweep"}}})
    with pytest.raises(SystemExit) as exit_info:
        CheckOutputs().on_multirun_start(cfg)
    assert exit_info.value.code == 2
    cfg.paths.runs = str(tmp_path / "runs")
    CheckOutputs().on_multirun_start(cfg)
    assert (tmp_path / "runs" / "sweep").is_dir()


def test_a_dataset_with_more_classes_than_num_classes_names_the_setting(tiny_cfg) -> None:
    from magnets.pipeline import train

    tiny_cfg.data.num_classes = 6  # Fashion-MNIST has 10
    with pytest.raises(ConfigError, match=r"^data.num_classes=6 is not valid; valid: at least 10: the train split has label 9"):
        train(tiny_cfg)


def test_a_run_folder_held_by_one_run_stops_a_second_at_once(tmp_path, monkeypatch) -> None:
    from magnets.errors import UserError
    from magnets.runs import run_lock

    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text() == f"pid {os.getpid()}\n"
        with pytest.raises(UserError, match=rf"run folder .*run is being written by pid {os.getpid()}: give this run its own"):
            with run_lock(tmp_path / "run"):
                pass
        monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning started writes where rank 0 does
        with run_lock(tmp_path / "run"):
            pass
        monkeypatch.delenv("LOCAL_RANK")
    with run_lock(tmp_path / "run"):  # released when the first run ended
        pass


def test_two_runs_started_in_one_second_get_two_folders(tmp_path) -> None:
    """Each run folder is named by start time and process id (the ``${pid:}`` resolver)."""
    script = (
        "import sys, magnets\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        f"with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base='1.3'):\n"
        f"    cfg = compose('config', overrides=['paths.runs={tmp_path}'], return_hydra_config=True)\n"
        "print(OmegaConf.select(cfg, 'hydra.run.dir'))\n"
    )
    started = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = [process.communicate(timeout=120)[0].strip() for process in started]
    pids = [process.pid for process in started]
    assert folders[0] != folders[1]
    for folder, pid in zip(folders, pids, strict=True):
        assert folder.startswith(f"{tmp_path}/default/") and folder.endswith(f"_{pid}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("maskgit.module.lr=-1", r"^maskgit.module.lr=-1 is not valid; valid: a positive number"),
        ("maskgit.module.label_smoothing=2", r"^maskgit.module.label_smoothing=2 is not valid; valid: a number in \[0, 1\)"),
        ("maskgit.module.betas=[0.9]", r"^maskgit.module.betas=\[0.9\] is not valid; valid: two numbers"),
        ("maskgit.module.warmup_steps=-5", r"^maskgit.module.warmup_steps=-5 is not valid"),
        ("trainer.precision=bogus", r"^trainer.precision='bogus' is not valid; valid: 32-true, 32, bf16-mixed"),
    ],
)
def test_bad_training_values_are_named_before_any_stage(tmp_path, override, message) -> None:
    cfg = compose_config([override, f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=message):
        check_train_config(cfg)


def test_a_nested_schedule_on_a_single_width_checkpoint_names_the_schedule_that_decodes_it() -> None:
    from magnets.cli import check_schedule

    with pytest.raises(ConfigError, match=r"^schedule.widths=\[8, 4, 2, 1\] is not valid; .*\[8\] \(one width: schedule=m8_12"):
        check_schedule("magnets_3333", [8])
    with pytest.raises(ConfigError, match=r"\(one width: schedule=maskgit_12 decodes it\)"):
        check_schedule("magnets_3333", [1])
    check_schedule("m8_12", [8])


def test_a_failed_checkpoint_save_leaves_no_partial_file(tmp_path) -> None:
    from magnets.runs import save_checkpoint_atomically

    class Strategy:
        def barrier(self) -> None:
            pass

    class Trainer:
        is_global_zero = True
        strategy = Strategy()

        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def save_checkpoint(self, path: Path) -> None:
            path.write_bytes(b"half a checkpoint")
            if self.fail:
                raise OSError(28, "No space left on device")

    target = tmp_path / "last.ckpt"
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_atomically(Trainer(fail=True), target)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint_atomically(Trainer(fail=False), target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_num_classes_is_checked_against_the_data_before_any_stage(tmp_path) -> None:
    from magnets.cli import check_data

    cfg = compose_config(["data.num_classes=6", f"paths.runs={tmp_path}", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"^data.num_classes=6 is not valid; valid: 10, the classes of fmnist"):
        check_train_config(cfg)
    lists = tmp_path / "ucf" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 Archery\r\n3 Basketball\r\n")
    ucf = compose_config(["experiment=ucf101_b", f"data.root={tmp_path / 'ucf'}", f"paths.runs={tmp_path}"]).data
    with pytest.raises(ConfigError, match=r"^data.num_classes=101 is not valid; valid: 3, the classes listed in .*classInd.txt"):
        check_data(ucf)
    ucf.num_classes = 3
    check_data(ucf)
