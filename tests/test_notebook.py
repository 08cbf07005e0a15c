"""notebooks/ablations.ipynb executed headless on a fixture results.csv, and on an empty runs folder."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imsave

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "ablations.ipynb"
FIGURES = ["fid_vs_gflops.png", "cache_ablation.png", "sample_grids.png"]
TABLES = ["pareto_front.csv", "cache_ablation.csv", "distill_ablation.csv", "schedule_ablation.csv"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = [
    "experiment",
    "checkpoint",
    "distill",
    "schedule",
    "widths",
    "steps_per_width",
    "cache",
    "guidance",
    "steps",
    "samples",
    "extractor",
    "fid",
    "class_acc",
    "gflops_per_sample",
    "seconds",
    "git_commit",
    "grid",
]

CKPT_P = "runs/fmnist/2025-01-01_00-00-00/checkpoints/last.ckpt"  # progressive distillation
CKPT_N = "runs/fmnist/2025-01-02_00-00-00/checkpoints/last.ckpt"  # nested, no distillation
LAYOUT = {  # schedule: (widths, steps_per_width, K)
    "maskgit_12": ("1", "12", 12),
    "magnets_3333": ("8-4-2-1", "3-3-3-3", 12),
    "scale_down_3333": ("1-2-4-8", "3-3-3-3", 12),
    "abrupt_6006": ("8-4-2-1", "6-0-0-6", 12),
    "maskgit_8": ("1", "8", 8),
    "magnets_2222": ("8-4-2-1", "2-2-2-2", 8),
}
# (checkpoint, schedule, cache, extractor, fid, class_acc, gflops, grid); file order, one configuration twice.
ROWS_P = [
    (CKPT_P, "maskgit_12", "refresh_on_switch", "fmnist_classifier", 20.0, 0.90, 10.0, "samples/maskgit_12.png"),
    (CKPT_P, "magnets_3333", "refresh_on_switch", "fmnist_classifier", 30.0, 0.70, 4.0, ""),  # re-run below
    (CKPT_P, "magnets_3333", "none", "fmnist_classifier", 21.5, 0.86, 6.0, "samples/magnets_3333_none.png"),
    (CKPT_P, "magnets_3333", "no_refresh", "fmnist_classifier", 25.0, 0.80, 3.5, "samples/never_written.png"),
    (CKPT_P, "magnets_3333", "refresh_every_n", "fmnist_classifier", 21.8, 0.85, 5.0, ""),
    (CKPT_P, "scale_down_3333", "refresh_on_switch", "fmnist_classifier", 28.0, 0.78, 4.0, ""),
    (CKPT_P, "abrupt_6006", "refresh_on_switch", "fmnist_classifier", 26.0, 0.79, 5.5, ""),
    (CKPT_P, "maskgit_8", "refresh_on_switch", "fmnist_classifier", 23.0, 0.84, 7.0, ""),
    (CKPT_P, "magnets_2222", "refresh_on_switch", "fmnist_classifier", 27.0, 0.77, 2.8, ""),
    (CKPT_P, "maskgit_12", "refresh_on_switch", "inception_offline", 40.0, 0.90, 10.0, ""),
    (CKPT_P, "magnets_3333", "refresh_on_switch", "inception_offline", 42.0, 0.85, 4.0, ""),
    (CKPT_P, "magnets_3333", "refresh_on_switch", "fmnist_classifier", 22.0, 0.85, 4.0, "samples/magnets_3333.png"),
]
ROWS_N = [
    (CKPT_N, "maskgit_12", "refresh_on_switch", "fmnist_classifier", 21.0, 0.88, 10.0, ""),
    (CKPT_N, "magnets_3333", "refresh_on_switch", "fmnist_classifier", 24.0, 0.82, 4.0, ""),
]
GRIDS = ["samples/maskgit_12.png", "samples/magnets_3333_none.png", "samples/magnets_3333.png"]


def write_results(folder: Path, rows: list[tuple], distill: str) -> None:
    """A results.csv in the format of `python -m magnets.evaluate`, and tiny PNG grids for the rows in GRIDS."""
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for checkpoint, schedule, cache, extractor, fid, acc, gflops, grid in rows:
            widths, steps_per_width, steps = LAYOUT[schedule]
            writer.writerow(
                [
                    "fmnist",
                    checkpoint,
                    distill,
                    schedule,
                    widths,
                    steps_per_width,
                    cache,
                    2.0,
                    steps,
                    100,
                    extractor,
                    fid,
                    acc,
                    gflops,
                    1.5,
                    "0123abc",
                    grid,
                ]
            )
    for grid in GRIDS:
        if any(row[-1] == grid for row in rows):
            (folder / grid).parent.mkdir(exist_ok=True)
            imsave(folder / grid, np.random.default_rng(0).random((16, 32)), cmap="gray")


def execute(runs: Path, figures: Path, work: Path):
    """Run the notebook from notebooks/ in a `python3` kernel that is this interpreter (the venv's), return it executed."""
    nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs the test extra nbformat")
    nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs the test extra nbclient")
    pytest.importorskip("ipykernel", reason="executing notebooks needs the test extra ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernelspec of our own: `python3` resolves to sys.executable, never to a python3 kernel installed elsewhere.
    spec = work / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    kernels = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    env = {
        **os.environ,
        "MAGNETS_RUNS": str(runs),
        "MAGNETS_FIGURES": str(figures),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures as outputs even where MPLBACKEND=Agg
        "IPYTHONDIR": str(work / "ipython"),  # no user profile or startup scripts
    }
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=KernelManager(kernel_name="python3", kernel_spec_manager=kernels, connection_file=str(work / "connection.json")),
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's cwd
    )
    client.execute(env=env)
    return notebook


def outputs(notebook, kind: str) -> list:
    """Every output of the code cells whose data (or stream text) has `kind`: a MIME type, or "stdout"."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "stdout" and output.get("name") == "stdout":
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The notebook executed on the fixture runs folder, and its figures folder."""
    tmp = tmp_path_factory.mktemp("ablations")
    write_results(tmp / "runs" / "fmnist" / "2025-01-01_00-00-00", ROWS_P, "progressive")
    write_results(tmp / "runs" / "fmnist" / "2025-01-02_00-00-00", ROWS_N, "none")
    figures = tmp / "figures"
    return execute(tmp / "runs", figures, tmp), figures


def test_notebook_is_stored_clean() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


def test_figures_are_saved_and_shown(executed) -> None:
    notebook, figures = executed
    for name in FIGURES:
        assert (figures / name).read_bytes().startswith(PNG_MAGIC), name
    assert not (figures / "sample_grids_2.png").exists()  # 3 grids exist on disk, 4 per figure
    assert all((figures / name).is_file() for name in TABLES)
    assert len(outputs(notebook, "image/png")) == len(FIGURES)
    stdout = "".join(outputs(notebook, "stdout"))
    assert "14 rows in 2 results.csv file(s): 13 configurations" in stdout
    assert "3 sample grid(s) found; 1 listed but missing on disk" in stdout


def test_cache_table_keeps_latest_rows(executed) -> None:
    _, figures = executed
    table = pd.read_csv(figures / "cache_ablation.csv")
    assert len(table) == 10  # (extractor, checkpoint, schedule): 6 + 2 for CKPT_P, 2 for CKPT_N
    modes = ["none", "refresh_on_switch", "refresh_every_n", "no_refresh"]
    metrics = ["fid", "class_acc", "gflops_per_sample"]
    assert [f"{metric}_{mode}" for metric in metrics for mode in modes] == list(table.columns[-12:])
    row = table[(table.checkpoint == CKPT_P) & (table.schedule == "magnets_3333") & (table.extractor == "fmnist_classifier")]
    assert len(row) == 1
    assert row[[f"fid_{mode}" for mode in modes]].iloc[0].tolist() == [21.5, 22.0, 21.8, 25.0]  # 22.0: the re-run
    assert row[[f"gflops_per_sample_{mode}" for mode in modes]].iloc[0].tolist() == [6.0, 4.0, 5.0, 3.5]
    assert row["class_acc_refresh_on_switch"].item() == 0.85


def test_pareto_front(executed) -> None:
    _, figures = executed
    front = pd.read_csv(figures / "pareto_front.csv")
    classifier = front[front.extractor == "fmnist_classifier"]
    assert list(zip(classifier.schedule, classifier.cache, classifier.fid, strict=True)) == [
        ("magnets_2222", "refresh_on_switch", 27.0),
        ("magnets_3333", "no_refresh", 25.0),
        ("magnets_3333", "refresh_on_switch", 22.0),
        ("magnets_3333", "refresh_every_n", 21.8),
        ("magnets_3333", "none", 21.5),
        ("maskgit_12", "refresh_on_switch", 20.0),
    ]
    assert set(classifier.checkpoint) == {CKPT_P}
    inception = front[front.extractor == "inception_offline"]
    assert list(inception.schedule) == ["magnets_3333", "maskgit_12"]  # its own panel: both points are on its front


def test_distill_and_schedule_tables(executed) -> None:
    _, figures = executed
    distill = pd.read_csv(figures / "distill_ablation.csv")
    assert len(distill) == 11  # (extractor, schedule, cache) configurations
    row = distill[(distill.schedule == "magnets_3333") & (distill.cache == "refresh_on_switch")].set_index("extractor")
    columns = ["fid_progressive", "fid_none", "class_acc_progressive", "class_acc_none"]
    assert row.loc["fmnist_classifier", columns].tolist() == [22.0, 24.0, 0.85, 0.82]
    assert row.loc["inception_offline", "fid_progressive"] == 42.0 and np.isnan(row.loc["inception_offline", "fid_none"])

    schedules = pd.read_csv(figures / "schedule_ablation.csv")
    assert len(schedules) == 13
    classifier = schedules[(schedules.checkpoint == CKPT_P) & (schedules.extractor == "fmnist_classifier")]
    ratio = dict(zip(classifier.schedule + "/" + classifier.cache, classifier.gflops_vs_maskgit, strict=True))
    assert ratio["magnets_3333/refresh_on_switch"] == pytest.approx(0.4)
    assert ratio["abrupt_6006/refresh_on_switch"] == pytest.approx(0.55)
    assert ratio["magnets_2222/refresh_on_switch"] == pytest.approx(0.4)  # against maskgit_8: same K
    assert ratio["maskgit_12/refresh_on_switch"] == 1.0
    assert np.isnan(ratio["magnets_3333/none"])  # no uncached maskgit_12 was evaluated
    assert set(classifier.family) == {"baseline", "scale up", "scale down", "abrupt"}


def test_no_results(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    notebook = execute(tmp_path / "runs", tmp_path / "figures", tmp_path)
    assert "No results.csv under" in "".join(outputs(notebook, "stdout"))
    assert not outputs(notebook, "image/png")
    assert not (tmp_path / "figures").exists()
