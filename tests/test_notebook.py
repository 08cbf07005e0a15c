"""notebooks/ablations.ipynb executed headless on fixture results.csv files (images and clips), and on an empty runs folder."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imsave

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "ablations.ipynb"
FIGURES = ["quality_vs_gflops.png", "cache_ablation.png", "decode_policies.png", "sample_grids.png", "frame_strips.png"]
TABLES = ["pareto_front.csv", "cache_ablation.csv", "distill_ablation.csv", "schedule_ablation.csv"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = [
    "experiment",
    "checkpoint",
    "distill",
    "task",
    "schedule",
    "widths",
    "steps_per_width",
    "cache",
    "guidance",
    "policy",
    "steps",
    "samples",
    "extractor",
    "fid",
    "fvd",
    "class_acc",
    "gflops_per_sample",
    "seconds",
    "git_commit",
    "grid",
]
OLD_COLUMNS = [c for c in COLUMNS if c not in ("task", "fvd", "policy")]  # the first format: images only
FID_DOMAIN = "FID-domain (classifier features)"
FVD_DOMAIN = "FVD-domain (not comparable to published FVD)"

CKPT_P = "runs/fmnist/2025-01-01_00-00-00/checkpoints/last.ckpt"  # progressive distillation
CKPT_N = "runs/fmnist/2025-01-02_00-00-00/checkpoints/last.ckpt"  # nested, no distillation; its results.csv: first format
CKPT_V = "runs/moving_fmnist/2025-02-01_00-00-00/checkpoints/last.ckpt"  # clips, class_cond, progressive
CKPT_W = "runs/moving_fmnist/2025-02-02_00-00-00/checkpoints/last.ckpt"  # clips, class_cond, no distillation
CKPT_F = "runs/moving_fmnist/2025-02-03_00-00-00/checkpoints/last.ckpt"  # clips, frame_pred (same experiment), progressive
LAYOUT = {  # schedule: (widths, steps_per_width, K)
    "maskgit_12": ("1", "12", 12),
    "magnets_3333": ("8-4-2-1", "3-3-3-3", 12),
    "scale_down_3333": ("1-2-4-8", "3-3-3-3", 12),
    "abrupt_6006": ("8-4-2-1", "6-0-0-6", 12),
    "maskgit_8": ("1", "8", 8),
    "magnets_2222": ("8-4-2-1", "2-2-2-2", 8),
}
POLICY_LAYOUT = {"maskgit_3": ("1", "3", 3), "maskgit_4": ("1", "4", 4), "sandwich_111": ("4-1-2", "1-1-1", 3)}
# (checkpoint, schedule, cache, extractor, fid or fvd, class_acc, gflops, grid); file order, one configuration twice.
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
VC = "video_classifier"
ROWS_V = [  # front: magnets_2222 (8.4), magnets_3333 (14), magnets_3333/none (24), maskgit_12 (40)
    (CKPT_V, "maskgit_12", "refresh_on_switch", VC, 300.0, 0.60, 40.0, ""),
    (CKPT_V, "magnets_3333", "refresh_on_switch", VC, 320.0, 0.55, 14.0, "samples/magnets_3333_frames.png"),
    (CKPT_V, "magnets_3333", "none", VC, 310.0, 0.57, 24.0, ""),
    (CKPT_V, "magnets_3333", "no_refresh", VC, 360.0, 0.50, 12.0, ""),  # cheaper than magnets_3333 but worse
    (CKPT_V, "scale_down_3333", "refresh_on_switch", VC, 340.0, 0.52, 14.0, ""),  # as cheap as magnets_3333, worse
    (CKPT_V, "maskgit_8", "refresh_on_switch", VC, 310.0, 0.56, 28.0, ""),  # ties magnets_3333/none at more GFLOPs
    (CKPT_V, "magnets_2222", "refresh_on_switch", VC, 350.0, 0.51, 8.4, ""),
]
ROWS_W = [  # the same panel as ROWS_V, dominated by its points
    (CKPT_W, "maskgit_12", "refresh_on_switch", VC, 305.0, 0.58, 40.0, ""),
    (CKPT_W, "magnets_3333", "refresh_on_switch", VC, 335.0, 0.50, 14.0, ""),
]
ROWS_F = [
    (CKPT_F, "maskgit_12", "refresh_on_switch", VC, 200.0, 0.70, 30.0, ""),
    (CKPT_F, "magnets_3333", "refresh_on_switch", VC, 210.0, 0.68, 9.0, ""),
    (CKPT_F, "maskgit_12", "refresh_on_switch", "i3d_torchscript", 500.0, 0.70, 30.0, ""),
    (CKPT_F, "magnets_3333", "refresh_on_switch", "i3d_torchscript", 520.0, 0.68, 9.0, ""),
    (CKPT_F, "magnets_3333", "none", "i3d_torchscript", 530.0, 0.68, 12.0, ""),  # dominated
]
GRIDS = {  # path: pixels (a frame strip: 2 clips of 8 frames)
    "samples/maskgit_12.png": (16, 32),
    "samples/magnets_3333_none.png": (16, 32),
    "samples/magnets_3333.png": (16, 32),
    "samples/magnets_3333_frames.png": (32, 128),
}
PANELS = {  # quality vs compute: panel title's second line and y label
    "fmnist · class_cond · fmnist_classifier · 100 samples": FID_DOMAIN,
    "fmnist · class_cond · inception_offline · 100 samples": "FID",
    "moving_fmnist · class_cond · video_classifier · 100 samples": FVD_DOMAIN,
    "moving_fmnist · frame_pred · video_classifier · 100 samples": FVD_DOMAIN,
    "moving_fmnist · frame_pred · i3d_torchscript · 100 samples": "FVD",
}


def write_results(
    folder: Path,
    rows: list[tuple],
    distill: str,
    experiment: str = "fmnist",
    task: str = "class_cond",
    distance: str = "fid",
    columns: list[str] = COLUMNS,
    guidance: float = 2.0,
) -> Path:
    """A results.csv in the format of `python -m magnets.evaluate` (or an older one), tiny PNG grids for the rows in GRIDS."""
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for checkpoint, schedule, cache, extractor, value, acc, gflops, grid, *policy in rows:
            widths, steps_per_width, steps = (LAYOUT | POLICY_LAYOUT)[schedule]
            row = {
                "experiment": experiment,
                "checkpoint": checkpoint,
                "distill": distill,
                "task": task,
                "schedule": schedule,
                "widths": widths,
                "steps_per_width": steps_per_width,
                "cache": cache,
                "guidance": guidance,
                "policy": policy[0] if policy else "",
                "steps": steps,
                "samples": 100,
                "extractor": extractor,
                "fid": value if distance == "fid" else "",
                "fvd": value if distance == "fvd" else "",
                "class_acc": acc,
                "gflops_per_sample": gflops,
                "seconds": 1.5,
                "git_commit": "0123abc",
                "grid": grid,
            }
            writer.writerow([row[c] for c in columns])
    for grid, shape in GRIDS.items():
        if any(row[7] == grid for row in rows):
            (folder / grid).parent.mkdir(exist_ok=True)
            imsave(folder / grid, np.random.default_rng(0).random(shape), cmap="gray")
    return folder / "results.csv"


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


def panel_lines(notebook) -> dict[str, str]:
    """The quality-vs-compute panels the notebook printed: panel name -> its y axis label."""
    stdout = "".join(outputs(notebook, "stdout"))
    return dict(re.findall(r"^panel (.+): y '(.+)', x 'GFLOPs per sample'", stdout, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path]:
    """The notebook executed on the fixture runs folder, its figures folder and the first-format results.csv."""
    tmp = tmp_path_factory.mktemp("ablations")
    runs = tmp / "runs"
    write_results(runs / "fmnist" / "2025-01-01_00-00-00", ROWS_P, "progressive")
    old = write_results(runs / "fmnist" / "2025-01-02_00-00-00", ROWS_N, "none", columns=OLD_COLUMNS)
    video = {"experiment": "moving_fmnist", "distance": "fvd"}
    write_results(runs / "moving_fmnist" / "2025-02-01_00-00-00", ROWS_V, "progressive", **video)
    write_results(runs / "moving_fmnist" / "2025-02-02_00-00-00", ROWS_W, "none", **video)
    write_results(runs / "moving_fmnist" / "2025-02-03_00-00-00", ROWS_F, "progressive", task="frame_pred", **video)
    figures = tmp / "figures"
    return execute(runs, figures, tmp), figures, old


def test_notebook_is_stored_clean() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


def test_figures_are_saved_and_shown(executed) -> None:
    notebook, figures, _ = executed
    for name in FIGURES:
        assert (figures / name).read_bytes().startswith(PNG_MAGIC), name
    assert not (figures / "sample_grids_2.png").exists()  # 3 grids exist on disk, 4 per figure
    assert not (figures / "frame_strips_2.png").exists()
    assert all((figures / name).is_file() for name in TABLES)
    assert len(outputs(notebook, "image/png")) == len(FIGURES)
    stdout = "".join(outputs(notebook, "stdout"))
    assert "28 rows in 5 results.csv file(s): 27 configurations" in stdout
    assert "3 sample grid(s) and 1 frame strip(s) found; 1 listed but missing on disk" in stdout


def test_first_format_loads(executed) -> None:
    """A results.csv without task and fvd is read as class_cond images, with a note; its rows join their panels."""
    notebook, figures, old = executed
    stdout = "".join(outputs(notebook, "stdout"))
    assert f"note: {old} has the first format (no task, policy, fvd): read with task=class_cond, policy=, fvd empty" in stdout
    assert stdout.count("has the first format") == 1
    schedules = pd.read_csv(figures / "schedule_ablation.csv")
    rows = schedules[schedules.checkpoint == CKPT_N]
    assert list(zip(rows.task, rows.metric, rows.distance, strict=True)) == [
        ("class_cond", FID_DOMAIN, 21.0),
        ("class_cond", FID_DOMAIN, 24.0),
    ]
    assert rows.fvd.isna().all()


def test_quality_panels(executed) -> None:
    """A panel per (experiment, task, extractor, samples), its y axis the metric: FVD-domain for the video classifier."""
    notebook, figures, _ = executed
    assert panel_lines(notebook) == PANELS
    front = pd.read_csv(figures / "pareto_front.csv")
    panels = front[["experiment", "task", "extractor", "samples", "metric"]].drop_duplicates()
    assert {(f"{e} · {t} · {x} · {n} samples", m) for e, t, x, n, m in panels.itertuples(index=False)} == set(PANELS.items())


def test_cache_table_keeps_latest_rows(executed) -> None:
    _, figures, _ = executed
    table = pd.read_csv(figures / "cache_ablation.csv")
    assert len(table) == 21  # (panel, checkpoint, schedule): 6 + 2 for CKPT_P, 2 for CKPT_N; 5 CKPT_V, 2 CKPT_W, 2 + 2 CKPT_F
    modes = ["none", "refresh_on_switch", "refresh_every_n", "no_refresh"]
    quantities = ["distance", "class_acc", "gflops_per_sample"]
    assert [f"{quantity}_{mode}" for quantity in quantities for mode in modes] == list(table.columns[-12:])
    row = table[(table.checkpoint == CKPT_P) & (table.schedule == "magnets_3333") & (table.extractor == "fmnist_classifier")]
    assert len(row) == 1
    assert row[[f"distance_{mode}" for mode in modes]].iloc[0].tolist() == [21.5, 22.0, 21.8, 25.0]  # 22.0: the re-run
    assert row[[f"gflops_per_sample_{mode}" for mode in modes]].iloc[0].tolist() == [6.0, 4.0, 5.0, 3.5]
    assert row["class_acc_refresh_on_switch"].item() == 0.85
    assert row["metric"].item() == FID_DOMAIN

    clips = table[(table.checkpoint == CKPT_V) & (table.schedule == "magnets_3333")]
    assert len(clips) == 1 and clips["metric"].item() == FVD_DOMAIN and clips["task"].item() == "class_cond"
    np.testing.assert_array_equal(clips[[f"distance_{mode}" for mode in modes]].iloc[0], [310.0, 320.0, np.nan, 360.0])
    np.testing.assert_array_equal(clips[[f"gflops_per_sample_{mode}" for mode in modes]].iloc[0], [24.0, 14.0, np.nan, 12.0])


def test_pareto_front(executed) -> None:
    _, figures, _ = executed
    front = pd.read_csv(figures / "pareto_front.csv")
    classifier = front[front.extractor == "fmnist_classifier"]
    assert list(zip(classifier.schedule, classifier.cache, classifier.distance, strict=True)) == [
        ("magnets_2222", "refresh_on_switch", 27.0),
        ("magnets_3333", "no_refresh", 25.0),
        ("magnets_3333", "refresh_on_switch", 22.0),
        ("magnets_3333", "refresh_every_n", 21.8),
        ("magnets_3333", "none", 21.5),
        ("maskgit_12", "refresh_on_switch", 20.0),
    ]
    assert classifier.fid.tolist() == classifier.distance.tolist() and classifier.fvd.isna().all()
    assert set(classifier.checkpoint) == {CKPT_P}
    inception = front[front.extractor == "inception_offline"]
    assert list(inception.schedule) == ["magnets_3333", "maskgit_12"]  # its own panel: both points are on its front

    clips = front[(front.extractor == VC) & (front.task == "class_cond")]
    assert list(zip(clips.schedule, clips.cache, clips.distance, clips.gflops_per_sample, strict=True)) == [
        ("magnets_2222", "refresh_on_switch", 350.0, 8.4),
        ("magnets_3333", "refresh_on_switch", 320.0, 14.0),
        ("magnets_3333", "none", 310.0, 24.0),
        ("maskgit_12", "refresh_on_switch", 300.0, 40.0),
    ]
    assert set(clips.checkpoint) == {CKPT_V} and set(clips.metric) == {FVD_DOMAIN}  # CKPT_W's points are dominated
    assert clips.fvd.tolist() == clips.distance.tolist() and clips.fid.isna().all()
    predicted = front[(front.extractor == VC) & (front.task == "frame_pred")]
    assert list(predicted.schedule) == ["magnets_3333", "maskgit_12"]
    i3d = front[front.extractor == "i3d_torchscript"]
    assert list(zip(i3d.schedule, i3d.cache, i3d.distance, strict=True)) == [
        ("magnets_3333", "refresh_on_switch", 520.0),
        ("maskgit_12", "refresh_on_switch", 500.0),
    ]
    assert set(i3d.metric) == {"FVD"}


def test_distill_and_schedule_tables(executed) -> None:
    _, figures, _ = executed
    distill = pd.read_csv(figures / "distill_ablation.csv")
    assert len(distill) == 23  # (panel, schedule, cache) configurations: 11 of images, 7 + 2 + 3 of clips
    images = distill[(distill.experiment == "fmnist") & (distill.schedule == "magnets_3333")]
    row = images[images.cache == "refresh_on_switch"].set_index("extractor")
    columns = ["distance_progressive", "distance_none", "class_acc_progressive", "class_acc_none"]
    assert row.loc["fmnist_classifier", columns].tolist() == [22.0, 24.0, 0.85, 0.82]
    assert row.loc["inception_offline", "distance_progressive"] == 42.0
    assert np.isnan(row.loc["inception_offline", "distance_none"])
    clips = distill[(distill.task == "class_cond") & (distill.extractor == VC) & (distill.cache == "refresh_on_switch")]
    clips = clips.set_index("schedule")
    assert clips.loc["magnets_3333", columns].tolist() == [320.0, 335.0, 0.55, 0.50]
    assert clips.loc["magnets_3333", "metric"] == FVD_DOMAIN

    schedules = pd.read_csv(figures / "schedule_ablation.csv")
    assert len(schedules) == 27
    classifier = schedules[(schedules.checkpoint == CKPT_P) & (schedules.extractor == "fmnist_classifier")]
    ratio = dict(zip(classifier.schedule + "/" + classifier.cache, classifier.gflops_vs_maskgit, strict=True))
    assert ratio["magnets_3333/refresh_on_switch"] == pytest.approx(0.4)
    assert ratio["abrupt_6006/refresh_on_switch"] == pytest.approx(0.55)
    assert ratio["magnets_2222/refresh_on_switch"] == pytest.approx(0.4)  # against maskgit_8: same K
    assert ratio["maskgit_12/refresh_on_switch"] == 1.0
    assert np.isnan(ratio["magnets_3333/none"])  # no uncached maskgit_12 was evaluated
    assert set(classifier.family) == {"baseline", "scale up", "scale down", "abrupt"}

    video = schedules[schedules.checkpoint == CKPT_V]
    ratio = dict(zip(video.schedule + "/" + video.cache, video.gflops_vs_maskgit, strict=True))
    assert ratio["magnets_3333/refresh_on_switch"] == pytest.approx(0.35)
    assert ratio["scale_down_3333/refresh_on_switch"] == pytest.approx(0.35)
    assert ratio["magnets_2222/refresh_on_switch"] == pytest.approx(0.3)  # against maskgit_8: same K
    assert np.isnan(ratio["magnets_3333/none"])
    assert set(video.metric) == {FVD_DOMAIN} and video.fvd.tolist() == video.distance.tolist() and video.fid.isna().all()
    predicted = schedules[(schedules.checkpoint == CKPT_F) & (schedules.extractor == VC)]
    ratio = dict(zip(predicted.schedule, predicted.gflops_vs_maskgit, strict=True))
    assert ratio == {"maskgit_12": 1.0, "magnets_3333": pytest.approx(0.3)}


@pytest.mark.parametrize(
    ("columns", "distance", "error"),
    [
        ([c for c in OLD_COLUMNS if c != "seconds"], "fid", "lacks the columns ['seconds']"),  # not task, fvd: those default
        (COLUMNS, "fid and fvd", "1 row(s) have both or neither of fid and fvd"),
        (COLUMNS, "fid", "i3d_torchscript gives fvd only"),
    ],
)
def test_malformed_results_raise(tmp_path: Path, columns: list[str], distance: str, error: str) -> None:
    nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs the test extra nbclient")
    rows = [(CKPT_F, "maskgit_12", "refresh_on_switch", "i3d_torchscript", 500.0, 0.70, 30.0, "")]
    folder = tmp_path / "runs" / "moving_fmnist" / "run"
    results = write_results(folder, rows, "none", distance=distance.split()[-1], columns=columns)
    if distance == "fid and fvd":
        frame = pd.read_csv(results)
        frame.assign(fid=frame.fvd).to_csv(results, index=False)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match=re.escape(error)):
        execute(tmp_path / "runs", tmp_path / "figures", tmp_path)


def test_no_results(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    notebook = execute(tmp_path / "runs", tmp_path / "figures", tmp_path)
    assert "No results.csv under" in "".join(outputs(notebook, "stdout"))
    assert not outputs(notebook, "image/png")
    assert not (tmp_path / "figures").exists()


SEED_PANEL = "fmnist · class_cond · inception_offline · 100 samples"
A, B, C, D, E = (  # the configurations of SEED_PANEL: (schedule/cache label, per-seed FIDs, GFLOPs)
    ("maskgit_12/refresh_on_switch", [10.0, 10.2, 9.8], 10.0),  # mean 10, std 0.2
    ("magnets_3333/refresh_on_switch", [12.0, 12.2, 11.8], 4.0),  # mean 12, std 0.2: clearly apart from A
    ("magnets_3333/none", [10.5, 9.0, 12.0], 6.0),  # mean 10.5, std 1.5: within the noise of A and of B
    ("magnets_2222/refresh_on_switch", [15.0], 2.8),  # one seed: a plain point, in no pair
    ("abrupt_6006/refresh_on_switch", [10.9, 11.1, 10.9, 11.1], 5.5),  # mean and std rows only (no seed rows)
)
SIGNIFICANT = {frozenset((A[0], B[0])), frozenset((A[0], E[0])), frozenset((B[0], E[0]))}


def seed_rows(label: str, fids: list[float], gflops: float, extractor: str, guidance: float = 2.0) -> list[dict]:
    """Rows as `python -m magnets.evaluate seeds=[...]` writes them: one per seed, then mean and std with several."""
    from magnets.results import RESULT_COLUMNS, aggregate_rows

    schedule, cache = label.split("/")
    widths, steps_per_width, steps = LAYOUT[schedule]
    shared = {"experiment": "fmnist", "checkpoint": CKPT_P, "distill": "progressive", "task": "class_cond",
              "schedule": schedule, "widths": widths, "steps_per_width": steps_per_width, "cache": cache,
              "guidance": guidance, "policy": "", "steps": steps, "samples": 100, "extractor": extractor, "reference": "test-100",
              "aggregate": "", "n_seeds": 1, "fvd": "", "rfid": 5.0, "inception_score": "", "inception_score_std": "",
              "class_acc": 0.5, "gflops_per_sample": gflops, "git_commit": "0123abc", "checkpoint_sha256": "c0ffee",
              "tokenizer_sha256": "70c0", "tokenizer_check": "match", "extractor_sha256": extractor[:4],
              "classifier_sha256": ""}  # fmt: skip
    rows = [shared | {"seed": seed, "fid": fid, "seconds": 1.0 + seed, "grid": ""} for seed, fid in enumerate(fids)]
    assert set(rows[0]) == set(RESULT_COLUMNS)
    return rows + (aggregate_rows(rows) if len(rows) > 1 else [])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The notebook executed on a results.csv of seed rows and their mean and std rows: SEED_PANEL, and a panel of 24
    two-seed configurations (6 schedules x 4 cache modes) for the figure's legibility."""
    from magnets.results import append_results

    tmp = tmp_path_factory.mktemp("seeds")
    results = tmp / "runs" / "fmnist" / "2025-03-01_00-00-00" / "results.csv"
    stale = seed_rows(A[0], [50.0], A[2], "inception_offline")  # an earlier evaluation of A's seed 0: superseded
    append_results(results, stale + seed_rows(*A, "inception_offline") + seed_rows(*B, "inception_offline"))
    append_results(results, seed_rows(*C, "inception_offline") + seed_rows(*D, "inception_offline"))
    append_results(results, [r for r in seed_rows(*E, "inception_offline") if r["aggregate"]])
    many = [
        seed_rows(f"{schedule}/{cache}", [20.0 + i, 21.0 + i], 2.0 + i % 9, "fmnist_classifier")
        for i, (schedule, cache) in enumerate((s, c) for s in LAYOUT for c in ("none", "refresh_on_switch", "no_refresh",
                                                                              "refresh_every_n"))
    ]  # fmt: skip
    append_results(results, [row for rows in many for row in rows])
    figures = tmp / "figures"
    return execute(tmp / "runs", figures, tmp), figures


def test_seeds_give_error_bars_an_rfid_floor_and_a_significance_table(seeded) -> None:
    notebook, figures = seeded
    stdout = "".join(outputs(notebook, "stdout"))
    assert "over several seeds" in stdout and ": 29 configurations" in stdout  # 5 + 24
    assert f"panel {SEED_PANEL}: y 'FID', x 'GFLOPs per sample'; " in stdout
    assert "4 with error bars; rFID floor 5" in stdout  # A, B, C, E; D has one seed
    assert "24 with error bars" in stdout
    assert (figures / "quality_vs_gflops.png").read_bytes().startswith(PNG_MAGIC)

    points = pd.read_csv(figures / "quality_points.csv")
    panel = points[points.extractor == "inception_offline"].set_index("label")
    assert panel["errorbar"].to_dict() == {A[0]: True, B[0]: True, C[0]: True, D[0]: False, E[0]: True}
    for label, fids, _ in (A, B, C, E):
        assert panel.loc[label, "distance"] == pytest.approx(np.mean(fids))  # A's stale row is not counted
        assert panel.loc[label, "distance_std"] == pytest.approx(np.std(fids, ddof=1), abs=1e-6)
        assert panel.loc[label, "n_seeds"] == len(fids)
    assert panel.loc[D[0], "n_seeds"] == 1 and np.isnan(panel.loc[D[0], "distance_std"])
    assert (panel["rfid"] == 5.0).all()

    pairs = pd.read_csv(figures / "significance.csv")
    pairs = pairs[pairs.extractor == "inception_offline"]
    assert len(pairs) == 6  # the pairs of A, B, C and E
    assert {frozenset((a, b)) for a, b, s in zip(pairs.a, pairs.b, pairs.significant, strict=True) if s} == SIGNIFICANT
    ac = pairs[pairs.a.isin([A[0], C[0]]) & pairs.b.isin([A[0], C[0]])].iloc[0]
    assert ac.se == pytest.approx(np.sqrt(0.2**2 / 3 + 1.5**2 / 3)) and abs(ac.difference) == pytest.approx(0.5)
    assert f"panel {SEED_PANEL}: 3 of 6 pair(s) differ by more than 2 SE" in stdout

    # The claims table of the Inception rows: the fixture's rows are at guidance 2, the claims at guidance 0.
    claims = pd.read_csv(figures / "claims_fmnist_inception_offline.csv")
    assert list(claims["claim"]) == ["a", "b", "c", "d", "e (m_8)", "e (m_4)", "e (m_2)"]
    assert set(claims["verdict"]) == {"not measured"} and "fmnist · inception_offline: {'not measured': 7}" in stdout
    assert not (figures / "claims_fmnist_fmnist_classifier.csv").exists()  # classifier features: no claims


WIDTH_ALONE = {8: "m8_12", 4: "m4_12", 2: "m2_12", 1: "maskgit_12"}  # the schedule of each width alone, 12 steps


def test_distillation_per_width_figure_reads_the_held_out_ce_of_each_run(tmp_path: Path) -> None:
    """Width-alone seed rows of a progressive, a no-distillation and a single-width m_8 run (checkpoints relative to the
    repository root, as `magnets.evaluate` writes them): one panel, bars with error bars, the runs' held-out CE."""
    from magnets.results import RESULT_COLUMNS, append_results

    runs = tmp_path / "runs"
    rows = []
    for distill, run, widths, offset in (("progressive", "p", (8, 4, 2, 1), 0.0), ("none", "n", (8, 4, 2, 1), 3.0),
                                         ("single", "s8", (8,), 6.0)):  # fmt: skip
        (runs / "fmnist" / run).mkdir(parents=True)
        (runs / "fmnist" / run / "metrics.json").write_text(json.dumps({f"val/loss/p{p}": 4.0 + p / 10 + offset for p in widths}))
        for p in widths:
            for seed, fid in enumerate((9.0, 10.0, 11.0)):
                row = dict.fromkeys(RESULT_COLUMNS, "")
                row |= {"experiment": "fmnist", "checkpoint": f"runs/fmnist/{run}/checkpoints/last.ckpt", "distill": distill,
                        "task": "class_cond", "schedule": WIDTH_ALONE[p], "widths": str(p), "steps_per_width": "12",
                        "cache": "none", "guidance": 0.0, "steps": 12, "samples": 100, "extractor": "inception_offline",
                        "seed": seed, "n_seeds": 1, "fid": fid + p + offset, "gflops_per_sample": 1.0 / p}  # fmt: skip
                rows.append(row)
    append_results(runs / "fmnist" / "results.csv", rows)
    figures = tmp_path / "figures"
    notebook = execute(runs, figures, tmp_path)
    stdout = "".join(outputs(notebook, "stdout"))
    assert "distillation panel fmnist · inception_offline: modes ['progressive', 'none', 'single'], widths [8, 4, 2, 1]" in stdout
    assert (figures / "distillation_per_width.png").read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(figures / "distillation_fmnist_inception_offline.csv").set_index(["distill", "width"])
    assert table.loc[("progressive", 8), "mean"] == pytest.approx(18.0) and table.loc[("progressive", 8), "std"] == 1.0
    assert table.loc[("none", 2), "mean"] == pytest.approx(15.0) and table.loc[("none", 2), "n"] == 3
    assert table.loc[("none", 4), "held_out_ce"] == pytest.approx(7.4)  # runs/fmnist/n/metrics.json, found from notebooks/
    assert table.loc[("single", 8), "held_out_ce"] == pytest.approx(10.8)
    assert table.loc[("single", 4), "n"] == 0  # no single-width m_4 was trained


def test_schedule_search_section_places_the_trials_against_the_shipped_front(tmp_path: Path) -> None:
    """Shipped schedules over three seeds and searched ones (search_*, the schedule search's names): one panel, the
    search table per trial, and the trials on or below the shipped front counted."""
    from magnets.results import append_results

    def trial(steps: str, fids: list[float], gflops: float) -> list[dict]:  # a searched schedule's rows
        rows = seed_rows("magnets_3333/refresh_on_switch", fids, gflops, "fmnist_classifier", guidance=0.0)
        return [row | {"schedule": f"search_{steps}", "steps_per_width": steps, "steps": sum(map(int, steps.split("-")))}
                for row in rows]  # fmt: skip

    shipped = [
        seed_rows("maskgit_12/refresh_on_switch", [10.0, 10.2, 9.8], 10.0, "fmnist_classifier", guidance=0.0),
        seed_rows("magnets_3333/refresh_on_switch", [12.0, 12.2, 11.8], 4.0, "fmnist_classifier", guidance=0.0),
        seed_rows("magnets_2222/refresh_on_switch", [15.0, 15.2, 14.8], 2.8, "fmnist_classifier", guidance=0.0),
    ]
    trials = [
        trial("2-2-4-4", [11.0], 4.0),  # one seed, below magnets_3333 at its GFLOPs: below by sign
        trial("6-2-2-2", [30.0], 3.0),  # above magnets_2222, the best shipped at <= 3.0
        trial("0-0-0-3", [12.5, 12.7, 12.3], 3.5),  # plain MaskGIT at K = 3, over seeds: below magnets_2222 by far
    ]
    runs = tmp_path / "runs"
    append_results(runs / "fmnist" / "2025-04-01_00-00-00" / "results.csv", [r for rows in shipped + trials for r in rows])
    figures = tmp_path / "figures"
    notebook = execute(runs, figures, tmp_path)
    stdout = "".join(outputs(notebook, "stdout"))
    assert ("search fmnist · fmnist_classifier · 100 samples: 3 searched configuration(s) against 3 shipped; "
            "position against the shipped front: {'below': 2, 'above': 1}") in stdout  # fmt: skip
    assert (figures / "schedule_search.png").read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(figures / "schedule_search_fmnist_fmnist_classifier.csv").set_index("schedule")
    assert list(table.index) == ["search_6-2-2-2", "search_0-0-0-3", "search_2-2-4-4"]  # by GFLOPs
    assert table.loc["search_2-2-4-4", "best_shipped"] == "magnets_3333/refresh_on_switch"
    assert table.loc["search_0-0-0-3", "best_shipped"] == "magnets_2222/refresh_on_switch"
    assert table["position"].to_dict() == {"search_6-2-2-2": "above", "search_0-0-0-3": "below", "search_2-2-4-4": "below"}
    assert table.loc["search_0-0-0-3", "n"] == 3 and table.loc["search_0-0-0-3", "difference"] == pytest.approx(-2.5)


def test_policies_section_places_each_policy_against_the_static_front(tmp_path: Path) -> None:
    """Static maskgit points at guidance 0 and three seeds each; a routed maskgit_4 below them, a sandwich above."""
    runs = tmp_path / "runs"
    rows = []
    for seed_offset in (-0.2, 0.0, 0.2):
        rows += [
            (CKPT_P, "maskgit_3", "refresh_on_switch", "fmnist_classifier", 18.0 + seed_offset, 0.9, 0.33, ""),
            (CKPT_P, "maskgit_4", "refresh_on_switch", "fmnist_classifier", 17.0 + seed_offset, 0.9, 0.42, ""),
            (CKPT_P, "maskgit_4", "refresh_on_switch", "fmnist_classifier", 16.5 + seed_offset, 0.9, 0.36, "",
             "route=confidence:8:0.5"),
            (CKPT_P, "sandwich_111", "refresh_on_switch", "fmnist_classifier", 19.0 + seed_offset, 0.9, 0.40, ""),
        ]  # fmt: skip
    results = write_results(runs / "fmnist" / "2025-01-01_00-00-00", rows, "progressive", guidance=0.0)
    frame = pd.read_csv(results)
    frame["seed"] = [i // 4 for i in range(len(frame))]
    frame["n_seeds"] = 1
    frame.to_csv(results, index=False)
    figures = tmp_path / "figures"
    notebook = execute(runs, figures, tmp_path)
    assert (figures / "decode_policies.png").read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(figures / "policies_fmnist_fmnist_classifier.csv")
    by_schedule = {(r.schedule, "" if pd.isna(r.policy) else r.policy): r for r in table.itertuples()}
    routed = by_schedule[("maskgit_4", "route=confidence:8:0.5")]
    assert routed.best_static == "maskgit_3/refresh_on_switch" and routed.position == "below"
    assert routed.difference == pytest.approx(-1.5)
    assert by_schedule[("sandwich_111", "")].position == "above"
    stdout = "".join(outputs(notebook, "stdout"))
    assert "position against the static front: {'below': 1, 'above': 1}" in stdout
