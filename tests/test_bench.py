import json

from hydra import compose, initialize_config_dir

from conftest import CONF_DIR
from magnets.bench import bench_decode, bench_model_config, bench_train, write_json
from magnets.flops import decode_flops_per_sample, forward_flops, nested_training_flop_ratio, planned_decode_work
from magnets.models.kv_cache import CACHE_MODES
from magnets.models.transformer import TransformerConfig
from magnets.sampling import load_schedule, shipped_schedules


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


def test_magnets_needs_2_8x_fewer_gflops_than_maskgit_at_the_imagenet_geometry():
    """Model b, 16x16 tokens, K=12: magnets_3333 with refresh on switch against uncached maskgit_12."""
    cfg = bench_model_config(bench_config(["model=b", "grid=[16,16]", "codebook_size=1024"]), [8, 4, 2, 1])

    def gflops(schedule, cache):
        work = planned_decode_work(cfg, load_schedule(schedule).width_per_step(cfg.widths), cache)
        return decode_flops_per_sample(cfg, work, samples=1) / 1e9

    assert gflops("maskgit_12", "none") / gflops("magnets_3333", "refresh_on_switch") >= 2.8
