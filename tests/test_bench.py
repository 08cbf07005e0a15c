import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from conftest import CONF_DIR
from magnets.bench import check_bench_config, run_bench
from magnets.benchmarks import bench_decode, bench_geometry, bench_model_config, bench_train, write_json
from magnets.choices import CACHE_MODES, MODEL_SIZES
from magnets.cli import run_entry
from magnets.decoding.flops import decode_flops_per_sample, forward_flops, nested_training_flop_ratio
from magnets.decoding.loop import SamplingSettings
from magnets.decoding.plan import plan_decode
from magnets.decoding.schedules import load_schedule, shipped_schedules
from magnets.errors import ConfigError
from magnets.models.tokenizer import tokenizer_config
from magnets.models.transformer import TransformerConfig
from magnets.task import build_task


def test_forward_flops_scale_with_width_and_match_a_hand_count():
    cfg = TransformerConfig(codebook_size=10, grid=[4], num_classes=2, dim=16, depth=1, heads=1, mlp_dim=32)
    # width 1: qkv 16x48 + out 16x16 + mlp 16x32 + 32x16 per query; attention 2 x 4 x 16 per query; head 16x10.
    per_query = 2 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16) + 2 * 2 * 4 * 16 + 2 * 16 * 10
    assert forward_flops(cfg, 1, 4) == 4 * per_query
    assert forward_flops(cfg, 8, 4) < forward_flops(cfg, 4, 4) < forward_flops(cfg, 1, 4)
    assert nested_training_flop_ratio(cfg) > 1 + 1 / 2 + 1 / 4 + 1 / 8  # attention does not shrink with width


def test_bench_train_writes_side_by_side_json(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["model=tiny", "batch_size=2", "grid=[4,4]", "warmup=0", "repeats=1"])
    result = bench_train(cfg)
    path = write_json(result, tmp_path / "bench" / "train.json")
    saved = json.loads(path.read_text())
    assert [r["model"] for r in saved["records"]] == ["nested", "single"]
    assert saved["records"][0]["widths"] == [8, 4, 2, 1] and saved["records"][1]["widths"] == [1]
    assert all(r["ms_per_step"] > 0 for r in saved["records"])
    assert saved["time_ratio_nested_vs_single"] == saved["records"][0]["ms_per_step"] / saved["records"][1]["ms_per_step"]
    assert saved["weight_flops_ratio_nominal"] == 1.875
    assert [p.name for p in path.parent.iterdir()] == ["train.json"]  # no temporary left


def bench_config(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=overrides)


def test_bench_decode_writes_one_record_per_configuration(tmp_path):
    cfg = bench_config(
        ["model=tiny", "batch_size=2", "grid=[4,4]", "warmup=0", "repeats=1", "decode_bench.caches=[none,no_refresh]"]
    )
    result = bench_decode(cfg)
    path = write_json(result, tmp_path / "decode.json")
    saved = json.loads(path.read_text())
    records = {(r["schedule"], r["cache"]): r for r in saved["records"]}
    assert set(records) == {(s, c) for s in cfg.decode_bench.schedules for c in ("none", "no_refresh")}
    base = records[("maskgit_12", "none")]
    assert base["speedup_vs_baseline"] == 1.0 and base["flops_ratio_vs_baseline"] == 1.0
    for r in saved["records"]:
        assert {"gflops_per_sample", "ms_per_sample", "speedup_vs_baseline", "flops_ratio_vs_baseline"} <= set(r)
        assert r["ms_per_sample"] > 0 and r["gflops_per_sample"] > 0
    assert records[("magnets_3333", "no_refresh")]["flops_ratio_vs_baseline"] > 2
    assert saved["matmul_gflops_per_s"] > 0
    assert {(r["schedule"], r["cache"]) for r in saved["flops_table"]} == {
        (s, c) for s in shipped_schedules() for c in CACHE_MODES
    }


def test_bench_decode_times_the_fast_path_beside_the_eager_one():
    """``decode_bench.paths=[eager,fast]``: every configuration on both paths, the same work, one eager baseline."""
    overrides = ["model=tiny", "batch_size=2", "grid=[4,4]", "warmup=1", "repeats=1", "decode_bench.paths=[eager,fast]"]
    decoding = ["decode_bench.schedules=[maskgit_12,magnets_3333]", "decode_bench.caches=[none,refresh_on_switch]"]
    cfg = bench_config([*overrides, *decoding])
    records = {(r["schedule"], r["cache"], r["path"]): r for r in bench_decode(cfg)["records"]}
    assert len(records) == 8 and records[("maskgit_12", "none", "eager")]["speedup_vs_baseline"] == 1.0
    for schedule, cache, _ in records:
        eager, fast = records[(schedule, cache, "eager")], records[(schedule, cache, "fast")]
        assert fast["gflops_per_sample"] == eager["gflops_per_sample"] and fast["ms_per_sample"] > 0
    with pytest.raises(ConfigError, match=r"decode_bench.paths.*'graphs'"):
        check_bench_config(bench_config(["decode_bench.paths=[graphs]"]))


def test_magnets_needs_2_8x_fewer_gflops_than_maskgit_at_the_imagenet_geometry():
    """Model b, 16x16 tokens, K=12: magnets_3333 with refresh on switch against uncached maskgit_12."""
    cfg = bench_model_config(MODEL_SIZES["b"], bench_geometry(bench_config(["grid=[16,16]", "codebook_size=1024"])), [8, 4, 2, 1])

    def gflops(schedule, cache):
        work = plan_decode(cfg.num_tokens, load_schedule(schedule).width_per_step(cfg.widths), cache).work()
        return decode_flops_per_sample(cfg, work, samples=1) / 1e9

    assert gflops("maskgit_12", "none") / gflops("magnets_3333", "refresh_on_switch") >= 2.8


def planned_gflops(cfg, schedule, cache, num_masked=None):
    """GFLOPs per sample of ``schedule`` x ``cache`` with the default decode settings."""
    settings = SamplingSettings.from_config(bench_config([]).decode)
    width_per_step = load_schedule(schedule).width_per_step(cfg.widths)
    work = plan_decode(
        cfg.num_tokens, width_per_step, cache, 2, settings.mask_schedule, settings.guided, num_masked=num_masked
    ).work()
    return decode_flops_per_sample(cfg, work, samples=1) / 1e9


def test_geometries_are_the_image_numbers_and_the_paper_video_tokenizer():
    image = bench_geometry(bench_config([]))
    assert (image.grid, image.codebook_size, image.num_classes, image.frame_pred_given_tokens) == ((16, 16), 1024, 1000, None)

    cfg = bench_config(["geometry=video"])
    video = bench_geometry(cfg)
    paper = OmegaConf.load(CONF_DIR / "tokenizer" / "causal3d_paper.yaml")
    tokenizer = tokenizer_config(paper.kind, paper.model)
    assert video.grid == tuple(tokenizer.grid) == (5, 16, 16) and video.codebook_size == tokenizer.codebook_size == 1000
    assert video.num_classes == 101 and cfg.batch_size < bench_config([]).batch_size
    # Kinetics-600: 5 conditioning frames of 17 = the first 2 of 5 latent frames; the same count training's task gives.
    assert video.frame_pred_given_tokens == 2 * 16 * 16
    assert video.frame_pred_given_tokens == build_task(cfg.geometry.frame_pred, paper.kind, paper.model).given_tokens

    overridden = bench_geometry(bench_config(["geometry=video", "grid=[3,4,4]", "codebook_size=64"]))
    assert (overridden.grid, overridden.codebook_size, overridden.frame_pred_given_tokens) == ((3, 4, 4), 64, 2 * 4 * 4)


def test_bench_at_video_geometry_writes_the_model_b_flop_table_of_both_tasks(tmp_path, capsys):
    """Timed at model tiny; the FLOP table is model b's on the paper's 5x16x16 grid, class-conditional and frame prediction."""
    cfg = bench_config(
        [
            "geometry=video", "model=tiny", "batch_size=1", "warmup=0", "repeats=1", f"out={tmp_path / 'decode.json'}",
            "decode_bench.schedules=[maskgit_12,magnets_3333]", "decode_bench.caches=[none,refresh_on_switch]",
        ]
    )  # fmt: skip
    check_bench_config(cfg)
    run_bench(cfg)
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["geometry"]["grid"] == [5, 16, 16] and saved["geometry"]["codebook_size"] == 1000
    assert saved["geometry"]["frame_pred_given_tokens"] == 512 and saved["flops_model"] == "b"
    assert len(saved["records"]) == 4 and all(r["ms_per_sample"] > 0 for r in saved["records"])

    table = {(r["task"], r["schedule"], r["cache"]): r for r in saved["flops_table"]}
    assert set(table) == {(t, s, c) for t in ("class_cond", "frame_pred") for s in shipped_schedules() for c in CACHE_MODES}
    assert {r["given_tokens"] for r in saved["flops_table"] if r["task"] == "frame_pred"} == {512}
    b = TransformerConfig.from_size("b", codebook_size=1000, grid=[5, 16, 16], num_classes=101, widths=[8, 4, 2, 1])
    assert table[("class_cond", "maskgit_12", "none")]["gflops_per_sample"] == pytest.approx(
        planned_gflops(b, "maskgit_12", "none")
    )
    assert table[("frame_pred", "magnets_3333", "refresh_on_switch")]["gflops_per_sample"] == pytest.approx(
        planned_gflops(b, "magnets_3333", "refresh_on_switch", num_masked=1280 - 512)
    )
    for schedule in shipped_schedules():
        for cache in CACHE_MODES:
            assert (
                table[("frame_pred", schedule, cache)]["gflops_per_sample"]
                < table[("class_cond", schedule, cache)]["gflops_per_sample"]
            )
    for task in ("class_cond", "frame_pred"):
        assert table[(task, "maskgit_12", "none")]["flops_ratio_vs_baseline"] == 1.0
        assert table[(task, "magnets_3333", "refresh_on_switch")]["flops_ratio_vs_baseline"] > 2

    printed = capsys.readouterr().out
    assert "analytic GFLOPs per sample at model b, 5x16x16 tokens" in printed
    assert printed.count("frame_pred") == len(shipped_schedules()) * len(CACHE_MODES)


def test_a_bad_geometry_is_named_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(HydraException, match=r"geometry/bogus") as raised:  # a missing group option: Hydra's own message
        bench_config(["geometry=bogus"])
    assert "image" in str(raised.value) and "video" in str(raised.value)

    for overrides, message in (
        (
            ["geometry=video", "geometry.tokenizer=bogus"],
            "error: geometry.tokenizer='bogus' is not valid; valid: causal3d_paper, ",
        ),
        (
            ["geometry=video", "grid=[2,16,16]"],
            "error: grid=[2, 16, 16] is not valid; valid: a [t, h, w] grid with more than the 2 ",
        ),
        (["geometry=image", "grid=null"], "error: grid=None is not valid; valid: a token grid"),
        (["flops_model=huge"], "error: flops_model='huge' is not valid; valid: tiny, fmnist, fmnist_paper, s, b, l, xl"),
    ):
        cfg = bench_config([*overrides, f"out={tmp_path / 'decode.json'}"])
        with pytest.raises(SystemExit) as exited:
            run_entry(run_bench, cfg, check_bench_config)
        assert exited.value.code == 2
        assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "decode.json").exists()  # nothing ran


def test_bench_train_under_bf16_autocast_reports_its_precision():
    """train_bench.precision=bf16-mixed: the step runs under bf16 autocast, as the GPU presets train."""
    cfg = bench_config(["bench=train", "model=tiny", "batch_size=2", "grid=[4,4]", "warmup=0", "repeats=1"])
    cfg.train_bench.precision = "bf16-mixed"
    result = bench_train(cfg)
    assert result["settings"]["train_bench"]["precision"] == "bf16-mixed"
    assert all(r["ms_per_step"] > 0 for r in result["records"])
    with pytest.raises(ConfigError, match=r"train_bench.precision='16-mixed'"):
        check_bench_config(bench_config(["train_bench.precision=16-mixed"]))


def test_compiled_width_losses_equal_the_eager_ones():
    """maskgit.module.compile: the same losses per width (a compiled forward), and the compiled forward is no submodule."""
    from magnets.lit.maskgit import NestedMaskGITModule

    model = {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "codebook_size": 16, "grid": [4, 4], "num_classes": 3}
    torch.manual_seed(0)
    eager = NestedMaskGITModule(model=model)
    compiled = NestedMaskGITModule(model=model, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict())
    tokens = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    inputs, labels = tokens.masked_fill(mask, 16), torch.tensor([0, 1, 2, 3])
    for width, (loss, _) in compiled.width_losses(inputs, tokens, mask, labels, alpha=0.5).items():
        expected = eager.width_losses(inputs, tokens, mask, labels, alpha=0.5)[width][0]
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_gpu_check_runs_every_part_and_writes_its_table_on_the_cpu(tmp_path):
    """The GPU check, shrunk to a tiny model on the CPU: every part runs, the JSON and the table are written."""
    from magnets.gpu_check import check_gpu_check_config, gpu_check

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "gpu_check",
            overrides=[
                "device=cpu", "model_size=tiny", "run_tests=false", "batch_sizes=[64]", "video_batch_size=1",
                "forward_batch_size=2", "train_batch_size=2", "warmup=0", "repeats=1", "train_compile=[false]",
                "bench_overrides=['grid=[4,4]']", "video_overrides=['grid=[3,4,4]']", f"out={tmp_path}",
            ],
        )  # fmt: skip
    check_gpu_check_config(cfg)
    result = gpu_check(cfg)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {d["geometry"] for d in saved["decode"]} == {"image", "video"}
    assert {r["path"] for r in saved["decode"][0]["records"]} == {"eager", "fast"}
    assert [row["width"] for row in saved["width_forwards"]] == [1, 2, 4, 8]
    targets = {row["target"]: row for row in result["targets"]}
    assert set(targets) == set(cfg.targets)
    cached = [r for r in saved["decode"][0]["records"] if (r["schedule"], r["cache"]) == ("magnets_3333", "refresh_on_switch")]
    assert targets["magnets_cached_b64_of_flop_ratio"]["value"] == max(r["speedup_over_flops_ratio"] for r in cached)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| magnets_cached_b64_of_flop_ratio |" in table and "| m_8 |" in table and "compile=False" in table


def test_bench_policies_keep_the_plain_decodes_and_name_plain_guidance(tmp_path):
    """A guided entry has no policy label of its own: it must not replace the plain decode of the same schedule."""
    cfg = bench_config(
        ["model=tiny", "batch_size=2", "grid=[4,4]", "warmup=0", "repeats=1", "decode_bench.caches=[none]",
         "decode_bench.schedules=[maskgit_12,maskgit_4]",
         "decode_bench.policies=[{schedule: maskgit_4, cache: none, guidance_scale: 1.0},"
         "{schedule: maskgit_4, cache: none, guidance_scale: 1.0, guidance_width: 8}]"]
    )  # fmt: skip
    check_bench_config(cfg)
    records = {(r["schedule"], r["policy"]): r for r in bench_decode(cfg)["records"]}
    assert set(records) == {("maskgit_12", ""), ("maskgit_4", ""), ("maskgit_4", "w=1"), ("maskgit_4", "guidance_width=8,w=1")}
    plain, guided = records[("maskgit_4", "")], records[("maskgit_4", "w=1")]
    assert guided["gflops_per_sample"] == pytest.approx(2 * plain["gflops_per_sample"])  # both passes at full width
    narrow = records[("maskgit_4", "guidance_width=8,w=1")]["gflops_per_sample"]
    assert plain["gflops_per_sample"] < narrow < guided["gflops_per_sample"]

    cfg.decode_bench.policies = [{"schedule": "maskgit_4"}]
    with pytest.raises(ConfigError, match=r"policies\[0\].*an entry that sets a policy or guidance"):
        check_bench_config(cfg)
    cfg.decode_bench.policies = [{"schedule": "maskgit_4", "guidance_scale": 1.0}] * 2
    with pytest.raises(ConfigError, match=r"policies\[1\].*an entry other than decode_bench.policies\[0\]"):
        check_bench_config(cfg)
