"""The papers' evaluation protocol: reference statistics from ADM's .npz, the Inception Score, resumable chunked sampling."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchmetrics.image.inception import InceptionScore

import magnets.evaluation as evaluation_module
from conftest import CONF_DIR
from magnets.cli import check_evaluate_config
from magnets.errors import ConfigError, MismatchError
from magnets.evaluate import evaluate
from magnets.evaluation import GeneratedBatch, SampleChunks, decode_conditions, inception_score, measure_samples
from magnets.metrics.fid import (
    FeatureStats,
    StatsFileError,
    feature_stats,
    fid,
    fid_metric,
    load_reference_file,
    resolve_reference,
)
from magnets.pipeline import train
from test_fid import PooledPixels, image_batches, needs_fid_helper


def write_adm_npz(path: Path, stats: FeatureStats, images: int | None) -> Path:
    """An ADM reference batch: mu, sigma, the spatial statistics ADM also stores and, if ``images``, arr_0 [N, H, W, 3]."""
    f = stats.num_features
    arrays = {"mu": stats.mean.numpy(), "sigma": stats.cov.numpy(), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    if images is not None:
        arrays["arr_0"] = np.zeros((images, 8, 8, 3), dtype=np.uint8)
    np.savez(path, **arrays)
    assert f == len(arrays["mu"])
    return path


def test_fid_from_adm_npz_equals_fid_from_features_in_place(tmp_path: Path) -> None:
    extractor = PooledPixels()
    real = feature_stats(image_batches(64, seed=0), extractor, progress=False)
    generated = feature_stats([batch.pow(2) for batch in image_batches(48, seed=1)], extractor, progress=False)
    expected = fid(generated, real)

    with_images = load_reference_file(write_adm_npz(tmp_path / "adm.npz", real, images=64), extractor.num_features)
    assert with_images.count == 64 and with_images.meta["layout"] == "adm"  # len(arr_0), read from its header
    assert fid(generated, with_images) == pytest.approx(expected, rel=1e-6)

    no_images = load_reference_file(write_adm_npz(tmp_path / "adm_stats_only.npz", real, images=None))
    assert no_images.meta["count"] == "unknown"
    assert fid(generated, no_images) == pytest.approx(expected, rel=1e-6)
    metric = fid_metric(extractor, no_images)  # the stand-in count only weighs sums: the same FID
    for batch in image_batches(48, seed=1):
        metric.update(batch.pow(2), real=False)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4)

    real.save(tmp_path / "own.npz")  # this project's FeatureStats layout is read too
    assert fid(generated, load_reference_file(tmp_path / "own.npz")) == pytest.approx(expected, rel=1e-12)

    def no_dataset():
        raise AssertionError("a given reference file needs no dataset")

    resolved = resolve_reference(tmp_path / "adm.npz", no_dataset, "fake", "test", extractor, tmp_path / "cache")
    assert fid(generated, resolved) == pytest.approx(expected, rel=1e-6)
    computed = resolve_reference(None, lambda: image_batches(64, seed=0), "fake", "test", extractor, tmp_path, progress=False)
    assert fid(generated, computed) == pytest.approx(expected, rel=1e-12)


def test_malformed_reference_npz_is_refused_naming_file_keys_and_expected_ones(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", foo=np.zeros(3), arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(StatsFileError, match=r"other\.npz: holds the keys \['arr_0', 'foo'\]; expected ADM's \['mu', 'sigma'\]"):
        load_reference_file(tmp_path / "other.npz")

    real = feature_stats(image_batches(32, seed=0), PooledPixels(), progress=False)  # 8 features
    write_adm_npz(tmp_path / "adm.npz", real, images=32)
    with pytest.raises(
        MismatchError, match=r"adm\.npz: holds statistics of 8 features \(keys \[.*'mu'.*\]\), but the extractor gives 2048"
    ):
        load_reference_file(tmp_path / "adm.npz", num_features=2048)

    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(StatsFileError, match=r"text\.npz: not readable reference statistics .*expected ADM's"):
        load_reference_file(tmp_path / "text.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(StatsFileError, match=r"shapes\.npz: .*mean must be \[F\] and cov \[F, F\]"):
        load_reference_file(tmp_path / "shapes.npz")

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        missing = compose("evaluate", overrides=[f"reference.npz={tmp_path / 'missing.npz'}"])
        zero_chunks = compose("evaluate", overrides=["chunk_size=0"])
    with pytest.raises(ConfigError, match=r"reference\.npz=.*missing\.npz' is not valid; valid: null or an existing \.npz"):
        check_evaluate_config(missing)
    with pytest.raises(ConfigError, match="chunk_size=0 is not valid; valid: a positive integer"):
        check_evaluate_config(zero_chunks)


def torchmetrics_inception_score(logits: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    """torchmetrics' InceptionScore over ``logits`` as its features (an identity network), its shuffle seeded."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=nn.Identity(), splits=splits)
    for batch in logits.split(16):
        metric.update(batch)
    torch.manual_seed(seed)
    mean, std = metric.compute()
    return float(mean), float(std)


@pytest.mark.parametrize("samples, splits", [(100, 10), (103, 10), (40, 1)])
def test_inception_score_equals_torchmetrics(samples: int, splits: int) -> None:
    generator = torch.Generator().manual_seed(samples)
    logits = torch.randn(samples, 12, generator=generator, dtype=torch.float64) * 3
    torch.manual_seed(7)
    order = torch.randperm(samples)  # the shuffle torchmetrics draws under the same seed
    ours = inception_score(logits[order], splits)
    theirs = torchmetrics_inception_score(logits, splits, seed=7)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-12)
    if splits > 1:
        assert ours[1] == pytest.approx(theirs[1], rel=1e-9)
    else:
        assert np.isnan(ours[1])
    float32 = inception_score(logits[order].float(), splits)  # computed in float64 whatever the logits' dtype
    assert float32[0] == pytest.approx(theirs[0], rel=1e-5)

    confident = torch.eye(12, dtype=torch.float64).repeat(10, 1) * 100  # every class equally often, each certain
    assert inception_score(confident, 10)[0] == pytest.approx(12, rel=1e-6)
    assert inception_score(torch.zeros(50, 12), 5) == pytest.approx((1.0, 0.0))


def test_measure_samples_inception_score_nan_without_logits_and_of_uint8_media(caplog: pytest.LogCaptureFixture) -> None:
    images = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = SimpleNamespace(cfg=None)  # no decode work: GFLOPs 0
    reference = feature_stats([images], PooledPixels(), progress=False)
    batches = [
        GeneratedBatch(part, torch.zeros(len(part), dtype=torch.long), torch.zeros(len(part), 1), []) for part in images.split(8)
    ]
    quality = measure_samples(batches, model, PooledPixels(name="no_logits_here"), reference, None)  # type: ignore[arg-type]
    assert np.isnan(quality.inception_score) and np.isnan(quality.inception_score_std)
    assert "no_logits_here" in caplog.text and "no classification head" in caplog.text

    class WithLogits(PooledPixels):
        def logits(self, media: torch.Tensor) -> torch.Tensor:
            return self(media)

    uint8 = [GeneratedBatch(b.images.mul(255).round().to(torch.uint8), b.labels, b.tokens, []) for b in batches]
    extractor = WithLogits()
    measured = measure_samples(uint8, model, extractor, reference, None, is_splits=3)  # type: ignore[arg-type]
    quantised = torch.cat([b.images for b in uint8]).float() / 255
    with torch.no_grad():
        assert measured.inception_score == pytest.approx(inception_score(extractor(quantised), 3)[0], rel=1e-6)


@needs_fid_helper
def test_offline_inception_torchscript_has_no_logits() -> None:
    from magnets.metrics.extractors import build_extractor

    extractor = build_extractor("inception_offline")
    names = [name for name, _ in extractor.net.named_parameters()]
    assert not any("fc" in name or "logit" in name for name in names)  # conv ... mixed_10, then the 8x8 pool
    assert sum(p.numel() for p in extractor.net.parameters()) < 22_000_000  # 21.8M; with the 1008-class fc 23.9M
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        features, logits = extractor.features_and_logits(images)
    assert features.shape == (1, 2048) and logits is None and "inception_fidelity" in extractor.logits_missing


def test_fidelity_inception_gives_features_and_logits_in_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from magnets.metrics.fid import FidelityInception

    torch.save({}, tmp_path / "weights.pth")  # random weights: only the wiring is tested
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
    extractor = FidelityInception(weights_path=tmp_path / "weights.pth")
    images = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, logits = extractor.features_and_logits(images)
        assert torch.equal(extractor(images), features)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits, features @ extractor.net.fc.weight.T, rtol=1e-4, atol=1e-4)  # logits_unbiased


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_interrupted_evaluation_resumes_to_the_unbroken_samples_and_row(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(tiny_cfg)
    runs = tiny_cfg.paths.runs
    base = [f"paths.runs={runs}", "samples=30", "chunk_size=8", "batch_size=4", "reference.count=40",
            "extractor=fmnist_classifier", f"classifier={tiny_cfg.classifier.path}", "is_splits=3"]  # fmt: skip

    def run(name: str, *extra: str) -> dict:
        overrides = [*base, f"samples_dir={tmp_path / name / 'samples'}", f"results={tmp_path / name / 'results.csv'}", *extra]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return evaluate(compose("evaluate", overrides=overrides))

    generate_calls = []
    original_generate = evaluation_module.generate_samples

    def counted_generate(*args, **kwargs):
        generate_calls.append(args[3].labels[0].item())  # the first label of each chunk's conditions
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "generate_samples", counted_generate)
    unbroken = run("unbroken", f"export_npz={tmp_path / 'samples.npz'}")
    assert len(generate_calls) == 4  # chunks of 8, 8, 8 and 6 samples
    (folder,) = (tmp_path / "unbroken" / "samples").iterdir()
    files = sorted(path.name for path in folder.iterdir())
    assert files == ["chunk-00000.npz", "chunk-00001.npz", "chunk-00002.npz", "chunk-00003.npz", "settings.json"]

    written = []
    original_write = SampleChunks.write

    def write_then_die(self, chunk, batches):
        batch = original_write(self, chunk, batches)
        written.append(chunk)
        if len(written) == 2:
            raise KeyboardInterrupt("interrupted after the 2nd chunk")
        return batch

    monkeypatch.setattr(SampleChunks, "write", write_then_die)
    generate_calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(SampleChunks, "write", original_write)
    resumed_folder = tmp_path / "resumed" / "samples" / folder.name  # the same key: the same settings
    assert sorted(path.name for path in resumed_folder.iterdir()) == ["chunk-00000.npz", "chunk-00001.npz", "settings.json"]
    generate_calls.clear()
    resumed = run("resumed")
    assert generate_calls == [6, 4]  # only chunks 2 and 3 (samples 16-23 and 24-29: labels 16 % 10, 24 % 10) decoded
    for path in folder.iterdir():
        assert (resumed_folder / path.name).read_bytes() == path.read_bytes(), path.name

    same = [column for column in unbroken if column != "seconds"]
    assert {c: resumed[c] for c in same} == {c: unbroken[c] for c in same}
    (row,) = read_rows(tmp_path / "resumed" / "results.csv")
    assert float(row["fid"]) == unbroken["fid"] and float(row["inception_score"]) >= 1 and row["reference"] == "test-40"

    exported = np.load(tmp_path / "samples.npz")
    assert exported["arr_0"].shape == (30, 32, 32, 3) and exported["arr_0"].dtype == np.uint8
    assert exported["arr_1"].tolist() == [i % 10 for i in range(30)]

    # A rerun reuses every chunk; keep_samples=false deletes them after the row; a given reference file is used.
    generate_calls.clear()
    (stats_file,) = Path(runs, "fid_stats").glob("*__test-40__*.npz")  # (training cached its validation reference there too)
    again = run("resumed", "keep_samples=false", f"reference.npz={stats_file}")
    assert generate_calls == [] and not resumed_folder.exists()
    assert again["fid"] == unbroken["fid"] and again["reference"] == stats_file.name

    # An export that fails after sampling appends no row (everything a row refers to is written first), so the
    # rerun appends it once.
    before = read_rows(tmp_path / "resumed" / "results.csv")

    def failing_export(chunks, path):
        raise OSError("disk full")

    monkeypatch.setattr(evaluation_module, "export_adm_npz", failing_export)
    with pytest.raises(OSError, match="disk full"):
        run("resumed", f"export_npz={tmp_path / 'again.npz'}")
    assert read_rows(tmp_path / "resumed" / "results.csv") == before


class FakeShard:
    """What decode_conditions reads of a token shard: tokens [S, N], labels [S], its length."""

    def __init__(self, items: int) -> None:
        self.tokens = np.arange(items * 3).reshape(items, 3)
        self.labels = np.arange(items) % 4

    def __len__(self) -> int:
        return len(self.labels)


def test_a_chunks_conditions_are_its_slice_of_the_whole_runs() -> None:
    class_cond = SimpleNamespace(name="class_cond", given_tokens=False)
    frame_pred = SimpleNamespace(name="frame_pred", given_tokens=True)
    whole = decode_conditions(class_cond, 25, 10)  # type: ignore[arg-type]
    assert torch.equal(decode_conditions(class_cond, 7, 10, start=16).labels, whole.labels[16:23])  # type: ignore[arg-type]
    shard = FakeShard(6)
    whole = decode_conditions(frame_pred, 25, 10, shard=shard)  # type: ignore[arg-type]
    chunk = decode_conditions(frame_pred, 7, 10, shard=shard, start=16)  # type: ignore[arg-type]
    assert torch.equal(chunk.labels, whole.labels[16:23]) and torch.equal(chunk.real_tokens, whole.real_tokens[16:23])
