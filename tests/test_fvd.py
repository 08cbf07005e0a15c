"""FVD: the Fréchet distance on clip features, the I3D detector's calling convention, the video classifier, clip statistics."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import synthetic_split
from magnets.data.moving_fmnist import MovingFMNISTDataModule
from magnets.errors import ConfigError, MismatchError, MissingFileError
from magnets.metrics.classifier import (
    Classifier,
    ClassifierCheckpointError,
    build_model,
    fit_classifier,
    load_classifier,
    save_classifier,
)
from magnets.metrics.extractors import (
    EXTRACTORS,
    VIDEO_EXTRACTORS,
    build_extractor,
    check_extractor_fits,
    domain_classifier_features,
    frechet_label,
    frechet_metric_name,
    fvd_label,
    media_kind,
)
from magnets.metrics.fid import (
    ClassifierFeatures,
    FeatureStats,
    feature_stats,
    fid,
    fid_metric,
    frechet_distance,
    reference_stats,
    stats_cache_path,
)
from magnets.metrics.fvd import (
    FVD_DOMAIN_LABEL,
    I3D_URL,
    I3DTorchScript,
    VideoClassifierFeatures,
    VideoFeatureExtractor,
)

TINY_VIDEO_ARCH = {"channels": [8, 8, 16, 16]}


def save_scripted(module: nn.Module, path: Path) -> Path:
    """``module`` compiled by ``torch.jit.script`` and saved to ``path``, as TorchScript detector files are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|save).* is deprecated", category=FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def random_clips(n: int, seed: int, frames: int = 17, size: int = 32, channels: int = 1) -> Tensor:
    """Float clips ``[n, channels, frames, size, size]`` in ``[0, 1]``."""
    return torch.rand(n, channels, frames, size, size, generator=torch.Generator().manual_seed(seed))


def untrained_video_classifier(path: Path, frames: int = 17, size: int = 32) -> Path:
    torch.manual_seed(0)
    model = build_model("video_cnn3d", TINY_VIDEO_ARCH, in_chans=1, num_classes=10).eval()
    save_classifier(Classifier(model, "video_cnn3d", size, 1, 10, 0.0, TINY_VIDEO_ARCH, frames), path)
    return path


# --- the distance ---------------------------------------------------------------------------------------------------


def test_frechet_distance_of_video_features_matches_scipy(tmp_path: Path) -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    extractor = VideoClassifierFeatures(untrained_video_classifier(tmp_path / "video.pt"))
    real, fake = random_clips(96, seed=0), random_clips(80, seed=1).pow(2)  # two different distributions
    with torch.no_grad():
        a, b = extractor(real).double().numpy(), extractor(fake).double().numpy()  # [N, 16]
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert expected > 0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # The same through the streaming statistics of batches of clips, as FVD computes it.
    stats_real = feature_stats(real.split(32), extractor, progress=False)
    stats_fake = feature_stats(fake.split(32), extractor, progress=False)
    assert stats_real.count == 96 and stats_real.num_features == extractor.num_features
    assert fid(stats_real, stats_fake) == pytest.approx(expected, rel=1e-4)


# --- I3D: the StyleGAN-V detector's calling convention ---------------------------------------------------------------


class I3DStandIn(nn.Module):
    """The forward signature of StyleGAN-V's ``i3d_torchscript.pt``; refuses any input but the verified convention.

    Accepts float32 ``[B, 3, T >= 9, 224, 224]`` in ``[-1, 1]`` with
    ``rescale=False, resize=False``; remembers the input's min, max and frame
    count in ``seen``. Its 400 "logits" are ``mean(x) * weight``: returned
    as they are with ``return_features=True``, as a softmax otherwise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-2.0, 2.0, 400))
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if rescale or resize:
            raise ValueError("rescale and resize must be off: the input is already in [-1, 1] at 224x224")
        if x.dim() != 5 or x.size(1) != 3 or x.size(2) < 9 or x.size(3) != 224 or x.size(4) != 224:
            raise ValueError("expected [B, 3, T >= 9, 224, 224]")
        if x.dtype != torch.float32:
            raise ValueError("expected float32")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise ValueError("expected values in [-1, 1]")
        self.seen.copy_(torch.stack([x.min(), x.max(), torch.tensor(float(x.size(2)))]))
        logits = x.mean(dim=(1, 2, 3, 4))[:, None] * self.weight[None, :]  # [B, 400]
        return logits if return_features else logits.softmax(dim=1)


@pytest.fixture
def stand_in_i3d(tmp_path: Path) -> Path:
    return save_scripted(I3DStandIn(), tmp_path / "i3d_torchscript.pt")


def test_stand_in_refuses_other_conventions(stand_in_i3d: Path) -> None:
    """The stand-in's checks are real: StyleGAN-V's own kwargs, a 4-D batch or uint8 values are refused."""
    net = I3DTorchScript(stand_in_i3d).net
    good = torch.zeros(1, 3, 9, 224, 224)
    assert net(good, rescale=False, resize=False, return_features=True).shape == (1, 400)
    for args, kwargs in [
        ((good,), {"rescale": True, "resize": True, "return_features": True}),
        ((good[:, :, 0],), {"return_features": True}),
        ((good.to(torch.uint8),), {"return_features": True}),
        ((good + 255,), {"return_features": True}),
        ((good[:, :, :8],), {"return_features": True}),
    ]:
        with pytest.raises(torch.jit.Error):
            net(*args, **kwargs)


def test_i3d_is_called_with_the_verified_convention(stand_in_i3d: Path) -> None:
    extractor = build_extractor("i3d_torchscript", path=stand_in_i3d)
    assert isinstance(extractor, I3DTorchScript) and extractor.media_kind == "video"
    assert extractor.weights_id == hashlib.sha256(stand_in_i3d.read_bytes()).hexdigest()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    weight = extractor.net.weight.detach()

    # Grey 32x32 clips, half black, half white: [0, 1] -> [-1, 1], resized to 224x224, replicated to RGB.
    clips = torch.zeros(2, 1, 17, 32, 32)
    clips[:, :, :, :, 16:] = 1.0
    with torch.no_grad():
        features = extractor(clips)
    seen_min, seen_max, seen_frames = extractor.net.seen.tolist()
    assert (seen_min, seen_max, seen_frames) == (-1.0, 1.0, 17.0)
    assert features.shape == (2, 400)
    mean = extractor.prepare(clips).mean(dim=(1, 2, 3, 4))  # [B]
    assert mean.abs().max() < 0.05  # half black, half white
    torch.testing.assert_close(features, mean[:, None] * weight[None])  # the logits (return_features=True), not a softmax

    # A constant clip maps to a constant input: value v -> round(255 v) / 255 * 2 - 1.
    for value in (0.0, 0.5, 1.0):
        with torch.no_grad():
            features = extractor(torch.full((1, 3, 9, 40, 24), value))
        expected = round(255 * value) / 255 * 2 - 1
        torch.testing.assert_close(features, expected * weight[None], atol=1e-5, rtol=1e-5)

    gray = random_clips(2, seed=3, frames=9, size=16)
    with torch.no_grad():
        torch.testing.assert_close(extractor(gray), extractor(gray.expand(-1, 3, -1, -1, -1)))  # grey is replicated to RGB
    with pytest.raises(ValueError, match="at least 9 frames, got 8"):
        extractor(random_clips(1, seed=0, frames=8))
    with pytest.raises(ValueError, match=r"clips \[B, C, T, H, W\]"):
        extractor(torch.rand(1, 3, 32, 32))


def test_missing_i3d_says_where_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "i3d_torchscript.pt"
    with pytest.raises(MissingFileError) as err:
        build_extractor("i3d_torchscript", path=missing)
    assert isinstance(err.value, FileNotFoundError)
    for part in (str(missing), I3D_URL, "extractor.path="):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError, match="extractor.path="):
        build_extractor("i3d_torchscript")


def test_i3d_refuses_a_file_that_is_not_the_detector(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a TorchScript archive")
    with pytest.raises(MismatchError, match="not a loadable TorchScript file"):
        I3DTorchScript(corrupt)
    with pytest.raises(MismatchError, match="not the I3D detector's forward"):
        I3DTorchScript(save_scripted(nn.Linear(3, 4), tmp_path / "other.pt"))


# --- the registry ----------------------------------------------------------------------------------------------------


def test_registry_kinds_and_labels(stand_in_i3d: Path, tmp_path: Path) -> None:
    assert set(EXTRACTORS) == {
        "inception_offline",
        "inception_fidelity",
        "fmnist_classifier",
        "video_classifier",
        "i3d_torchscript",
    }
    assert VIDEO_EXTRACTORS == {"video_classifier", "i3d_torchscript"}
    assert [media_kind(name) for name in ("inception_offline", "video_classifier")] == ["image", "video"]
    assert frechet_label("i3d_torchscript") == fvd_label("i3d_torchscript") == "FVD"
    assert fvd_label("video_classifier") == FVD_DOMAIN_LABEL == "FVD-domain (not comparable to published FVD)"
    assert frechet_label("inception_offline") == "FID"
    with pytest.raises(ValueError, match="takes images, not clips.*i3d_torchscript"):
        fvd_label("inception_offline")
    with pytest.raises(ValueError, match="unknown feature extractor 'i3d'") as err:
        build_extractor("i3d")
    assert all(name in str(err.value) for name in EXTRACTORS)

    video = domain_classifier_features(untrained_video_classifier(tmp_path / "video.pt"))
    assert isinstance(video, VideoClassifierFeatures) and frechet_metric_name(video) == "fvd"
    assert frechet_label(video) == FVD_DOMAIN_LABEL
    i3d = I3DTorchScript(stand_in_i3d)
    check_extractor_fits(i3d, video)
    image = ClassifierFeatures(image_classifier_checkpoint(tmp_path / "image.pt"))
    assert frechet_metric_name(image) == "fid"
    with pytest.raises(ConfigError, match="extractor='i3d_torchscript'.*images"):
        check_extractor_fits(i3d, image)


# --- the video classifier --------------------------------------------------------------------------------------------


def image_classifier_checkpoint(path: Path, with_frames_key: bool = False) -> Path:
    """An untrained image classifier saved as checkpoints were before clips: no ``frames`` key."""
    model = build_model("resnet10t", {"channels": [8, 8, 16, 16], "stem_width": 8}, 1, 10)
    save_classifier(Classifier(model, "resnet10t", 32, 1, 10, 0.0, {"channels": [8, 8, 16, 16], "stem_width": 8}), path)
    if not with_frames_key:
        payload = torch.load(path, weights_only=True)
        del payload["frames"]
        torch.save(payload, path)
    return path


def synthetic_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like ``train`` / ``test`` images ``[N, 28, 28]`` whose rectangle size is the class."""
    images, labels = synthetic_split(200 if split == "train" else 60, seed=0 if split == "train" else 1)
    return images, labels


@pytest.fixture(scope="module")
def tiny_moving_fmnist(tmp_path_factory: pytest.TempPathFactory) -> MovingFMNISTDataModule:
    """250 moving synthetic-item videos (UCF101 layout, fold 1): ~170 train, 70 test clips of 9 frames 32x32."""
    root = tmp_path_factory.mktemp("moving")
    datamodule = MovingFMNISTDataModule(
        root, video_frames=12, clips_per_group=1, frames=9, size=32, val_size=10, batch_size=16, scan_workers=1
    )
    datamodule.load_images = synthetic_images  # no Fashion-MNIST files needed
    datamodule.prepare_data()
    return datamodule


def test_video_classifier_trains_round_trips_and_extracts(tiny_moving_fmnist: MovingFMNISTDataModule, tmp_path: Path) -> None:
    path = tmp_path / "video_classifier.pt"
    trained = fit_classifier(tiny_moving_fmnist, path, arch_kwargs=TINY_VIDEO_ARCH, epochs=1, batch_size=16, progress=False)
    loaded = load_classifier(path)
    assert (loaded.arch, loaded.frames, loaded.image_size, loaded.in_chans, loaded.media_kind) == (
        "video_cnn3d",
        9,
        32,
        1,
        "video",
    )
    assert loaded.test_accuracy == pytest.approx(trained.test_accuracy)
    clips = random_clips(4, seed=0, frames=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(clips), trained.model(clips))

    extractor = build_extractor("video_classifier", path=path)
    assert isinstance(extractor, VideoClassifierFeatures) and extractor.num_features == 16 and extractor.frames == 9
    nn.ModuleDict({"extractor": extractor}).train()  # as Lightning does to the module holding the metric
    assert not extractor.training
    with torch.no_grad():
        assert extractor(clips).shape == (4, 16)
        assert extractor(random_clips(3, seed=1, frames=9, size=48, channels=3)).shape == (3, 16)  # RGB, another size
        assert extractor.logits(clips).shape == (4, 10)
    with pytest.raises(ValueError, match="trained on clips of 9 frames, got 17"):
        extractor(random_clips(1, seed=0, frames=17))
    with pytest.raises(ClassifierCheckpointError, match="classifies clips of 9 frames.*video_classifier"):
        ClassifierFeatures(path)
    with pytest.raises(ValueError, match=r"cannot classify clips.*video_cnn3d"):
        fit_classifier(tiny_moving_fmnist, tmp_path / "no.pt", arch="resnet10t", epochs=1, progress=False)


def test_video_checkpoint_is_checked_and_old_image_checkpoints_still_load(tmp_path: Path) -> None:
    old = image_classifier_checkpoint(tmp_path / "old.pt")
    assert "frames" not in torch.load(old, weights_only=True)
    assert load_classifier(old).frames is None and load_classifier(old).media_kind == "image"
    assert isinstance(domain_classifier_features(old), ClassifierFeatures)
    with pytest.raises(ClassifierCheckpointError, match="classifies images, not clips.*fmnist_classifier"):
        VideoClassifierFeatures(old)

    video = untrained_video_classifier(tmp_path / "video.pt")
    payload = torch.load(video, weights_only=True)
    del payload["frames"]  # a clip architecture that claims to classify images
    torch.save(payload, video)
    with pytest.raises(ClassifierCheckpointError, match="'video_cnn3d' does not classify images"):
        load_classifier(video)


# --- reference statistics of clips -----------------------------------------------------------------------------------


class PooledClips(VideoFeatureExtractor):
    """A cheap video extractor for tests: 4x4x4 average-pooled pixels through a fixed random map; counts its calls."""

    def __init__(self, weights_id: str = "0" * 64) -> None:
        super().__init__("pooled_clips", num_features=8, weights_id=weights_id)
        self.proj = nn.Linear(64, 8)
        self.calls = 0

    def forward(self, clips: Tensor) -> Tensor:
        self.calls += 1
        pooled = nn.functional.adaptive_avg_pool3d(self.check_clips(clips).mean(dim=1), 4)  # [B, T, H, W] -> [B, 4, 4, 4]
        return self.proj(pooled.flatten(1))  # [B, 64] -> [B, 8]


def clip_loader(n: int, seed: int, frames: int = 17, size: int = 32) -> DataLoader:
    """A media datamodule's kind of loader: ``(uint8 [B, 1, T, H, W], labels)`` batches."""
    clips = (random_clips(n, seed, frames, size) * 255).round().to(torch.uint8)
    return DataLoader(TensorDataset(clips, torch.arange(n) % 10), batch_size=16)


def test_reference_stats_of_clips_are_cached_and_keyed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    extractor = PooledClips()
    first = reference_stats(clip_loader(40, seed=0), "mfmnist", "test", extractor, tmp_path, progress=False)
    path = stats_cache_path(tmp_path, "mfmnist", "test", extractor, "1x17x32x32")
    assert path.is_file() and first.count == 40 and first.meta["geometry"] == "1x17x32x32"
    calls = extractor.calls
    assert calls == 3

    again = reference_stats(clip_loader(40, seed=0), "mfmnist", "test", extractor, tmp_path, progress=False)
    assert extractor.calls == calls, "cached statistics must be loaded, not recomputed"
    assert torch.equal(again.mean, first.mean) and torch.equal(again.cov, first.cov)

    # Other clip lengths, resolutions or weights are other files, computed afresh.
    fewer_frames = reference_stats(clip_loader(40, seed=0, frames=9), "mfmnist", "test", extractor, tmp_path, progress=False)
    assert extractor.calls == calls + 3 and fewer_frames.meta["geometry"] == "1x9x32x32"
    smaller = reference_stats(clip_loader(40, seed=0, size=16), "mfmnist", "test", extractor, tmp_path, progress=False)
    assert extractor.calls == calls + 6 and smaller.meta["geometry"] == "1x17x16x16"
    other_weights = PooledClips(weights_id="1" * 64)
    reference_stats(clip_loader(40, seed=0), "mfmnist", "test", other_weights, tmp_path, progress=False)
    assert other_weights.calls == 3
    names = {p.name for p in tmp_path.glob("*.npz")}
    assert names == {
        "mfmnist__test__1x17x32x32__pooled_clips__0000000000000000.npz",
        "mfmnist__test__1x9x32x32__pooled_clips__0000000000000000.npz",
        "mfmnist__test__1x17x16x16__pooled_clips__0000000000000000.npz",
        "mfmnist__test__1x17x32x32__pooled_clips__1111111111111111.npz",
    }

    # A file holding another geometry's statistics under this name is refused and recomputed.
    stats_cache_path(tmp_path, "mfmnist", "test", extractor, "1x9x32x32").replace(path)
    with pytest.warns(UserWarning, match="'geometry': '1x9x32x32'"):
        reference_stats(clip_loader(40, seed=0), "mfmnist", "test", extractor, tmp_path, progress=False)
    assert FeatureStats.load(path).meta["geometry"] == "1x17x32x32"
    with pytest.raises(ValueError, match="geometry '17/32' cannot name a cache file"):
        stats_cache_path(tmp_path, "mfmnist", "test", extractor, "17/32")


def test_torchmetrics_fvd_with_preloaded_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    extractor = PooledClips()
    reference = reference_stats(clip_loader(48, seed=0), "mfmnist", "val", extractor, tmp_path, progress=False)
    metric = fid_metric(extractor, reference)
    generated = [random_clips(16, seed=s).pow(2) for s in (1, 2, 3)]
    for clips in generated:
        metric.update(clips, real=False)
    expected = fid(reference, feature_stats(generated, extractor, progress=False))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4)
