"""Reconstruction FID: a perfect tokenizer scores ~0, a lossy one more; the value is cached; the tokenizer stage records it."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from magnets.evaluation import media_key
from magnets.files import file_sha256
from magnets.metrics.fid import FeatureExtractor, feature_stats
from magnets.metrics.reconstruction import reconstruction_fid, rfid_cache_path
from magnets.pipeline import fit_tokenizer


class PooledProjection(FeatureExtractor):
    """A tiny deterministic extractor: 4x4 average pooling, then a fixed random projection to 8 features."""

    def __init__(self) -> None:
        super().__init__("pooled_projection", 8, "0" * 64)
        generator = torch.Generator().manual_seed(0)
        self.projection = nn.Parameter(torch.randn(16, 8, generator=generator), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.check_images(images), 4)  # [B, 1, 4, 4]
        return torch.tanh(pooled.flatten(1) @ self.projection)  # [B, 16] -> [B, 8]


class IdentityTokenizer(nn.Module):
    """Ids are the uint8 levels of the pixels, so decode(encode(x)) == x for quantised x; ``noise`` makes it lossy."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.noise = noise
        self.encode_calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return x.mul(255).round().long()  # [B, C, H, W]

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        images = ids.float() / 255
        if self.noise:
            images = images + self.noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        return images.clamp(0, 1)


def random_batches(count: int = 96, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(uint8 [B, 1, 16, 16], labels [B])`` batches of smooth random images, with an empty batch in between."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 1, 4, 4, generator=generator)
    images = nn.functional.interpolate(coarse, size=16, mode="bilinear").mul(255).round().to(torch.uint8)  # [N, 1, 16, 16]
    batches = [
        (images[i : i + batch_size], torch.zeros(len(images[i : i + batch_size]), dtype=torch.int64))
        for i in range(0, count, batch_size)
    ]
    empty = (torch.empty(0, 1, 16, 16, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    return [batches[0], empty, *batches[1:], empty]


@pytest.fixture
def extractor_and_reference():
    extractor = PooledProjection()
    reference = feature_stats(random_batches(), extractor, progress=False)
    return extractor, reference


def test_perfect_reconstruction_scores_zero_and_lossy_more(extractor_and_reference):
    extractor, reference = extractor_and_reference
    assert reference.count == 96  # the empty batches add nothing
    perfect = reconstruction_fid(IdentityTokenizer(), random_batches, extractor, reference, progress=False)
    scale = reference.cov.trace().item()
    assert abs(perfect) < 1e-6 * scale
    lossy = reconstruction_fid(IdentityTokenizer(noise=0.3), random_batches, extractor, reference, progress=False)
    assert lossy > 1e-2 * scale and lossy > 1e4 * abs(perfect)


def test_empty_batches_are_skipped(extractor_and_reference):
    extractor, reference = extractor_and_reference
    tokenizer = IdentityTokenizer(noise=0.1)
    with_empty = reconstruction_fid(tokenizer, random_batches, extractor, reference, progress=False)
    assert tokenizer.encode_calls == 3  # three non-empty batches; the empty ones never reach the tokenizer
    without = reconstruction_fid(
        IdentityTokenizer(noise=0.1), lambda: [b for b in random_batches() if len(b[0])], extractor, reference, progress=False
    )
    assert with_empty == pytest.approx(without, rel=1e-12)


def test_value_is_cached_and_read_back_without_the_tokenizer(extractor_and_reference, tmp_path: Path):
    extractor, reference = extractor_and_reference
    path = rfid_cache_path(tmp_path / "fid_stats", "ab" * 32, extractor, "fmnist32", "test-96", "test-96")
    assert path.name == f"rfid__{'ab' * 8}__pooled_projection__{'0' * 16}__fmnist32__test-96__test-96.json"
    tokenizer = IdentityTokenizer(noise=0.2)
    value = reconstruction_fid(tokenizer, random_batches, extractor, reference, cache_path=path, progress=False)
    record = json.loads(path.read_text())
    assert record["rfid"] == value and record["count"] == 96 and record["extractor"] == "pooled_projection"

    calls = tokenizer.encode_calls
    items_called = []
    again = reconstruction_fid(tokenizer, lambda: items_called.append(1), extractor, reference, cache_path=path, progress=False)
    assert again == value and tokenizer.encode_calls == calls and not items_called

    path.write_text("{not json")  # an unreadable cache file is recomputed and rewritten
    assert reconstruction_fid(tokenizer, random_batches, extractor, reference, cache_path=path, progress=False) == value
    assert json.loads(path.read_text())["rfid"] == value


def test_cache_name_parts_must_be_safe(extractor_and_reference, tmp_path: Path):
    extractor, _ = extractor_and_reference
    with pytest.raises(ValueError, match="cannot name a cache file"):
        rfid_cache_path(tmp_path, "ab" * 32, extractor, "fmnist32", "test/96", "test-96")


def test_tokenizer_stage_writes_rfid_into_metrics(tiny_cfg):
    tiny_cfg.tokenizer_eval.enabled = True
    tiny_cfg.tokenizer_eval.rfid_count = 10  # the Inception on 2 x 10 images: a few seconds on CPU
    checkpoint = fit_tokenizer(tiny_cfg)
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert metrics["rfid_extractor"] == "inception_offline" and metrics["rfid_count"] == 10 and metrics["rfid_split"] == "test"
    assert "test/psnr" in metrics
    # Cached under the name evaluate's rFID uses for reference split test, count 10.
    cache_dir = Path(tiny_cfg.paths.runs, "fid_stats")
    cached = json.loads(next(cache_dir.glob("rfid__*.json")).read_text())
    assert cached["rfid"] == metrics["rfid"] and cached["count"] == 10
    name = next(cache_dir.glob("rfid__*.json")).name
    assert name.startswith(f"rfid__{file_sha256(checkpoint)[:16]}__inception_offline__")
    assert name.endswith(f"__{media_key(tiny_cfg.data)}__test-10__test-10.json")


def test_tokenizer_stage_skips_rfid_when_the_extractor_takes_other_media(tiny_cfg, caplog):
    tiny_cfg.tokenizer_eval.enabled = True
    tiny_cfg.tokenizer_eval.extractor.name = "video_classifier"
    with caplog.at_level("INFO", logger="magnets.pipeline"):
        checkpoint = fit_tokenizer(tiny_cfg)
    assert "rfid" not in json.loads((checkpoint.parent / "metrics.json").read_text())
    assert any("rFID skipped" in record.getMessage() for record in caplog.records)
