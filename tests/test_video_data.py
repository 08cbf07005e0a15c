"""Video reading: lossless round trip, UCF101 / Kinetics layouts, counted skips, clip sampling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from decord import VideoReader, cpu

from magnets.data.moving_fmnist import write_video
from magnets.data.video import (
    Kinetics600DataModule,
    KineticsLayout,
    SplitListError,
    UCF101DataModule,
    UCF101Layout,
    VideoDecodeError,
    held_out_groups,
)
from magnets.errors import ConfigError, DataNotFoundError


def noise(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB frames ``[T, H, W, 3]``: the hardest case for a lossless codec."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def counter(frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Grey frames ``[T, H, W]`` whose every pixel is ``5 * t``: a frame's value names its index."""
    return np.broadcast_to((5 * np.arange(frames, dtype=np.uint8))[:, None, None], (frames, height, width)).copy()


def write_ucf(root: Path, videos: dict[str, np.ndarray | bytes | None], classes=("Bowling", "HandstandPushups")) -> None:
    """A UCF101 tree: ``videos`` maps ``Class/v_Class_gXX_cYY.avi`` (as listed) to frames, raw bytes, or None (not written).

    Groups 1-7 go to testlist01, the rest to trainlist01 (label from the class), lines CRLF.
    """
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes(b"".join(f"{i + 1} {c}\r\n".encode() for i, c in enumerate(classes)))
    train, test = [], []
    for name, content in videos.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            write_video(path, content)
        group = int(name.split("_g")[1][:2])
        label = [c.lower() for c in classes].index(name.split("/")[0].lower()) + 1
        (test if group <= 7 else train).append(name if group <= 7 else f"{name} {label}")
    (lists / "trainlist01.txt").write_bytes("".join(f"{line}\r\n" for line in train).encode())
    (lists / "testlist01.txt").write_bytes("".join(f"{line}\r\n" for line in test).encode())


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_decord_reads_back_exactly_what_pyav_wrote(tmp_path, suffix):
    rgb = noise(12, 24, 40)
    write_video(tmp_path / f"rgb{suffix}", rgb)
    reader = VideoReader(str(tmp_path / f"rgb{suffix}"), ctx=cpu(0), num_threads=1)
    assert len(reader) == 12
    np.testing.assert_array_equal(reader.get_batch(list(range(12))).asnumpy(), rgb)
    np.testing.assert_array_equal(reader.get_batch([9, 2, 5]).asnumpy(), rgb[[9, 2, 5]])  # seeks, not just a scan
    grey = rgb[..., 0]
    write_video(tmp_path / f"grey{suffix}", grey)
    back = VideoReader(str(tmp_path / f"grey{suffix}"), ctx=cpu(0), num_threads=1).get_batch(list(range(12))).asnumpy()
    np.testing.assert_array_equal(back, np.repeat(grey[..., None], 3, axis=-1))


def test_ucf_lists_crlf_and_case_quirk(tmp_path):
    # On disk: HandstandPushups/v_HandStandPushups_*; the lists say v_HandstandPushups_* and handstandpushups/.
    write_ucf(tmp_path, {"Bowling/v_Bowling_g08_c01.avi": counter(3), "Bowling/v_Bowling_g01_c01.avi": counter(3)})
    for name in ("v_HandStandPushups_g09_c02.avi", "v_HandStandPushups_g02_c01.avi"):
        write_video(tmp_path / "HandstandPushups" / name, counter(3))
    lists = tmp_path / "ucfTrainTestlist"
    with (lists / "trainlist01.txt").open("ab") as f:
        f.write(b"HandstandPushups/v_HandstandPushups_g09_c02.avi 2\r\n")
    with (lists / "testlist01.txt").open("ab") as f:
        f.write(b"handstandpushups/v_HandStandPushups_g02_c01.avi\r\n\r\n")
    layout = UCF101Layout(tmp_path)
    assert layout.class_names() == ["Bowling", "HandstandPushups"]
    train, test = layout.entries("train"), layout.entries("test")
    assert [(e.path.relative_to(tmp_path).as_posix(), e.label) for e in train] == [
        ("Bowling/v_Bowling_g08_c01.avi", 0),
        ("HandstandPushups/v_HandStandPushups_g09_c02.avi", 1),
    ]
    assert [(e.path.relative_to(tmp_path).as_posix(), e.label) for e in test] == [
        ("Bowling/v_Bowling_g01_c01.avi", 0),
        ("HandstandPushups/v_HandStandPushups_g02_c01.avi", 1),  # label from the folder, found ignoring case
    ]
    assert all(e.path.is_file() for e in train + test)
    (lists / "testlist01.txt").write_bytes(b"Nowhere/v_Nowhere_g01_c01.avi\r\n")
    with pytest.raises(SplitListError, match="testlist01.txt:1: class folder 'Nowhere'"):
        layout.entries("test")


def test_fold_selects_the_lists_and_val_is_a_seeded_hold_out(tmp_path):
    write_ucf(tmp_path, {f"Bowling/v_Bowling_g{g:02d}_c01.avi": counter(3) for g in range(1, 26)}, classes=("Bowling",))
    lists = tmp_path / "ucfTrainTestlist"
    (lists / "trainlist02.txt").write_bytes(b"Bowling/v_Bowling_g01_c01.avi 1\r\n")
    (lists / "testlist02.txt").write_bytes(b"Bowling/v_Bowling_g25_c01.avi\r\n")
    fold2 = UCF101Layout(tmp_path, fold=2)
    assert [e.listed_as for e in fold2.entries("train")] == ["Bowling/v_Bowling_g01_c01.avi"]
    assert [e.listed_as for e in fold2.entries("test")] == ["Bowling/v_Bowling_g25_c01.avi"]
    fold1 = UCF101Layout(tmp_path, fold=1, val_size=5, seed=3)
    train, val = [e.listed_as for e in fold1.entries("train")], [e.listed_as for e in fold1.entries("val")]
    assert len(train) == 13 and len(val) == 5 and not set(train) & set(val)
    assert val == [e.listed_as for e in UCF101Layout(tmp_path, fold=1, val_size=5, seed=3).entries("val")]
    assert val != [e.listed_as for e in UCF101Layout(tmp_path, fold=1, val_size=5, seed=4).entries("val")]
    with pytest.raises(FileNotFoundError, match="trainlist03.txt"):
        UCF101Layout(tmp_path, fold=3).entries("train")
    with pytest.raises(ConfigError, match="fold=4"):
        UCF101Layout(tmp_path, fold=4)


def test_val_holds_out_whole_groups():
    """Clips of one UCF101 group come from one long video: a group is all in val or all in train."""
    names = [f"Bowling/v_Bowling_g{g:02d}_c{c:02d}.avi" for g in range(8, 26) for c in range(1, 4)]
    names += [f"Drumming/v_drumming_g{g:02d}_c{c:02d}.avi" for g in range(8, 26) for c in range(1, 5)]
    in_val = held_out_groups(names, val_size=10, seed=0)
    assert 10 <= sum(in_val) < 10 + 4  # whole groups, just past val_size
    groups: dict[tuple[str, str], set[bool]] = {}
    for name, held in zip(names, in_val, strict=True):
        groups.setdefault((name.split("/")[0], name.split("_g")[1][:2]), set()).add(held)
    assert all(len(sides) == 1 for sides in groups.values())
    assert held_out_groups(names, 10, seed=0) == in_val and held_out_groups(names, 10, seed=1) != in_val
    assert not any(held_out_groups(names, 0, seed=0))


def test_kinetics_csv_parsing(tmp_path):
    (tmp_path / "annotations").mkdir()
    header = "label,youtube_id,time_start,time_end,split\n"
    (tmp_path / "annotations" / "train.csv").write_text(
        header + "playing bagpipes,aaaaaaaaaaa,5,15,train\nabseiling,bbbbbbbbbbb,120,130,train\n"
    )
    (tmp_path / "annotations" / "validate.csv").write_text(header + "abseiling,ccccccccccc,0,10,val\n")
    (tmp_path / "annotations" / "test.csv").write_text(header + "juggling,ddddddddddd,0,10,test\n")
    write_video(tmp_path / "playing_bagpipes" / "aaaaaaaaaaa_000005_000015.mp4", counter(3))  # folder with underscores
    layout = KineticsLayout(tmp_path)
    assert layout.class_names() == ["abseiling", "playing bagpipes"]
    train = layout.entries("train")
    assert [(e.path.relative_to(tmp_path).as_posix(), e.label) for e in train] == [
        ("playing_bagpipes/aaaaaaaaaaa_000005_000015.mp4", 1),
        ("abseiling/bbbbbbbbbbb_000120_000130.mp4", 0),
    ]
    assert [(e.listed_as, e.label) for e in layout.entries("val")] == [("abseiling/ccccccccccc_000000_000010.mp4", 0)]
    with pytest.raises(SplitListError, match="'juggling'"):
        layout.entries("test")
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "elsewhere")):
        KineticsLayout(tmp_path, split_dir=tmp_path / "elsewhere").entries("train")
    # The test CSV may lack labels (label -1); train and val may not.
    (tmp_path / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\nddddddddddd,0,10,test\n")
    assert [e.label for e in KineticsLayout(tmp_path).entries("test")] == [-1]
    (tmp_path / "annotations" / "validate.csv").write_text(header + ",ccccccccccc,0,10,val\n")
    with pytest.raises(SplitListError, match=r"validate.csv:2: no label"):
        KineticsLayout(tmp_path).entries("val")


def test_bad_files_are_counted_skips_listed_in_the_report(tmp_path, caplog):
    good = {f"Bowling/v_Bowling_g{g:02d}_c01.avi": counter(20) for g in (8, 9, 10)}
    write_video(tmp_path / "whole.avi", noise(24, 32, 32))
    write_video(tmp_path / "whole.mp4", noise(24, 32, 32))
    avi, mp4 = (tmp_path / "whole.avi").read_bytes(), (tmp_path / "whole.mp4").read_bytes()
    bad = {
        "Bowling/v_Bowling_g11_c01.avi": np.random.default_rng(0).bytes(5000),  # garbage
        "Bowling/v_Bowling_g12_c01.avi": avi[: len(avi) // 2],  # truncated AVI: decord finds half the frames
        "Bowling/v_Bowling_g13_c01.avi": mp4[: len(mp4) // 2],  # truncated MP4 (index at the end): won't open
        "Bowling/v_Bowling_g14_c01.avi": counter(16),  # too short for 17 frames
        "Bowling/v_Bowling_g15_c01.avi": None,  # listed, not there
        "Bowling/v_Bowling_g16_c01.avi": counter(20, 32, 16),  # 16 wide: decord 0.6 cannot return its frames
    }
    write_ucf(tmp_path / "ucf", {**good, **bad}, classes=("Bowling",))
    reports = tmp_path / "reports"
    datamodule = UCF101DataModule(tmp_path / "ucf", frames=17, size=16, channels=1, val_size=0, report_dir=reports)
    with caplog.at_level(logging.WARNING):
        dataset = datamodule.dataset("train")
    assert len(dataset) == len(good)
    report = json.loads((reports / "train_skips.json").read_text())
    assert (report["listed"], report["items"], report["skipped"]) == (9, 3, 6)
    reasons = {Path(s["file"]).name: s["reason"] for s in report["skips"]}
    assert reasons["v_Bowling_g11_c01.avi"].startswith("unreadable")
    assert reasons["v_Bowling_g12_c01.avi"].startswith("truncated: header declares 24 frames")
    assert reasons["v_Bowling_g13_c01.avi"].startswith("unreadable")
    assert reasons["v_Bowling_g14_c01.avi"] == "too short: 16 frames, a clip of 17 at stride 1 needs 17"
    assert reasons["v_Bowling_g15_c01.avi"] == "missing"
    assert reasons["v_Bowling_g16_c01.avi"].startswith("unreadable")
    assert "skipped 6 of 9" in caplog.text and str(reports / "train_skips.json") in caplog.text
    # A second run reads the probes from the cache and says the same.
    again = UCF101DataModule(tmp_path / "ucf", frames=17, size=16, channels=1, val_size=0, report_dir=reports)
    assert len(again.dataset("train")) == len(good)
    assert json.loads((reports / "train_skips.json").read_text()) == report
    # A file that breaks after the probe fails loudly, naming itself and the check command.
    victim = dataset.paths[0]
    victim.write_bytes(b"\0" * 100)
    with pytest.raises(VideoDecodeError, match=f"{victim}.*data-check"):
        dataset[0]


def test_no_readable_video_is_an_error_not_an_empty_dataset(tmp_path):
    write_ucf(tmp_path, {"Bowling/v_Bowling_g08_c01.avi": None}, classes=("Bowling",))
    with pytest.raises(DataNotFoundError, match="none of the 1 videos"):
        UCF101DataModule(tmp_path, frames=5, val_size=0).dataset("train")
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "absent")):
        UCF101DataModule(tmp_path / "absent", frames=5).dataset("train")


def test_clip_sampling_offsets_stride_and_shape(tmp_path):
    # 30 frames valued 5t; a clip of 5 frames at stride 3 spans 13 frames: starts 0..17, centre 8.
    write_ucf(tmp_path, {f"Bowling/v_Bowling_g0{g}_c01.avi": counter(30) for g in (1, 8)}, ("Bowling",))
    datamodule = UCF101DataModule(tmp_path, frames=5, stride=3, size=32, channels=1, val_size=0)
    train, test = datamodule.dataset("train"), datamodule.dataset("test")
    torch.manual_seed(0)
    starts = set()
    for _ in range(30):
        x, label = train[0]
        assert x.shape == (1, 5, 32, 32) and x.dtype == torch.uint8 and label == 0
        values = x[0, :, 0, 0].tolist()
        assert values == [values[0] + 15 * i for i in range(5)]  # stride 3 -> 5 * 3 apart
        assert (x == x[:, :, :1, :1]).all()  # every pixel of a frame is its value: nothing resampled
        starts.add(values[0] // 5)
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 17
    assert {train.start(0) for _ in range(400)} == set(range(18))  # every valid start, the last one included
    for _ in range(3):
        assert test[0][0][0, :, 0, 0].tolist() == [5 * (8 + 3 * i) for i in range(5)]  # the centre clip, always
    fixed = datamodule.dataset("train", augment=False)  # what tokenization reads: the same clip every time
    assert {fixed[0][0][0, 0, 0, 0].item() for _ in range(5)} == {5 * 8}
    info = datamodule.media_info()
    splits = {"layout": "ucf101", "fold": 1, "val_size": 0, "seed": 0}
    assert info == {
        "kind": "video",
        "frames": 5,
        "stride": 3,
        "resolution": [32, 32],
        "fps": 25.0,
        "channels": 1,
        "splits": splits,
    }


def test_resize_crop_and_grey(tmp_path):
    # 20x40 frames: left half pure red, right half pure blue, a column ramp in green.
    frames = np.zeros((5, 20, 40, 3), dtype=np.uint8)
    frames[:, :, :20, 0], frames[:, :, 20:, 2] = 255, 255
    write_ucf(tmp_path, {"Bowling/v_Bowling_g01_c01.avi": frames}, ("Bowling",))
    rgb = UCF101DataModule(tmp_path, frames=5, size=10, channels=3).dataset("test")[0][0]
    grey = UCF101DataModule(tmp_path, frames=5, size=10, channels=1).dataset("test")[0][0]
    assert rgb.shape == (3, 5, 10, 10) and grey.shape == (1, 5, 10, 10)
    # short side 20 -> 10: 10x20, centre crop keeps columns 5..14: red | blue, five each.
    assert (rgb[0, :, :, :4] == 255).all() and (rgb[2, :, :, 6:] == 255).all() and (rgb[1] == 0).all()
    assert (grey[0, :, :, :4] == round(0.299 * 255)).all() and (grey[0, :, :, 6:] == round(0.114 * 255)).all()


def test_kinetics_datamodule_reads_its_splits(tmp_path):
    (tmp_path / "annotations").mkdir()
    header = "label,youtube_id,time_start,time_end,split\n"
    for name, rows in (("train", ["b", "a"]), ("validate", ["a"]), ("test", ["b"])):
        lines = [f"{label},{name[:3]}{i:08d},0,10,{name}\n" for i, label in enumerate(rows)]
        (tmp_path / "annotations" / f"{name}.csv").write_text(header + "".join(lines))
        for i, label in enumerate(rows):
            write_video(tmp_path / label / f"{name[:3]}{i:08d}_000000_000010.mp4", counter(8))
    datamodule = Kinetics600DataModule(tmp_path, frames=5, size=32, channels=1, batch_size=2)
    assert [len(datamodule.dataset(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (2, 1, 5, 32, 32) and x.dtype == torch.uint8 and sorted(y.tolist()) == [0, 1]
    assert datamodule.dataset("test")[0][1] == 1
