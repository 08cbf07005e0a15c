from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from magnets.data.base import MediaLoaders
from magnets.errors import ConfigError
from magnets.lit.tokenizer import TokenizerModule
from magnets.models.fsq import FSQ
from magnets.models.tokenizer import build_tokenizer, token_grid, tokenizer_config
from magnets.models.video_tokenizer import CausalTokenizerConfig, CausalVideoTokenizer
from magnets.models.vq import VectorQuantizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "tokenizer"

# 9 frames of 16x16 -> 3 x 4 x 4 tokens (f_t = 4, f_s = 4), 60 codes.
TINY = {
    "frames": 9,
    "image_size": 16,
    "temporal_downsample": 4,
    "channels": [4, 8, 8],
    "num_res_blocks": 1,
    "level_res_blocks": 1,
    "fsq_levels": [5, 4, 3],
}


def tiny(**overrides) -> CausalVideoTokenizer:
    torch.manual_seed(0)
    return CausalVideoTokenizer(CausalTokenizerConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("f_t", [2, 4])
def test_encoder_is_causal(factorized, f_t):
    model = tiny(factorized=factorized, temporal_downsample=f_t)
    clips = torch.rand(2, 1, 9, 16, 16)
    latents = model.encode_latents(clips)  # [2, 3, 1 + 8 / f_t, 4, 4]
    ids = model.encode(clips)
    for c in range(latents.shape[2] - 1):
        # Frames 1 + f_t * c onwards changed: latent frames 0 .. c must not move, latent frame c + 1 must.
        changed = clips.clone()
        changed[:, :, 1 + f_t * c :] = torch.rand_like(changed[:, :, 1 + f_t * c :])
        latents_changed = model.encode_latents(changed)
        torch.testing.assert_close(latents_changed[:, :, : c + 1], latents[:, :, : c + 1], rtol=0, atol=1e-6)
        assert torch.equal(model.encode(changed)[:, : c + 1], ids[:, : c + 1])
        assert not torch.allclose(latents_changed[:, :, c + 1], latents[:, :, c + 1])
        # And the prefix alone is the same as the prefix of the whole clip.
        prefix = model.encode_latents(clips[:, :, : 1 + f_t * c])
        assert prefix.shape[2] == c + 1
        torch.testing.assert_close(prefix, latents[:, :, : c + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("factorized", [True, False])
def test_decoder_is_causal(factorized):
    model = tiny(factorized=factorized)
    ids = torch.randint(0, model.codebook_size, (2, *model.grid))
    clips = model.decode(ids)
    for c in range(model.grid[0] - 1):
        changed = ids.clone()
        changed[:, c + 1 :] = (changed[:, c + 1 :] + 1) % model.codebook_size
        # Latent frames 0 .. c alone make frames 0 .. 4c, and latent frame c + 1 reaches frame 4c + 1 (its group's first).
        decoded = model.decode(changed)
        torch.testing.assert_close(decoded[:, :, : 1 + 4 * c], clips[:, :, : 1 + 4 * c], rtol=0, atol=1e-6)
        assert not torch.allclose(decoded[:, :, 1 + 4 * c], clips[:, :, 1 + 4 * c], atol=1e-6)


@pytest.mark.parametrize(("frames", "f_t", "t"), [(1, 4, 1), (5, 4, 2), (17, 4, 5), (9, 2, 5), (3, 1, 3)])
def test_1_plus_ft_n_frames_become_1_plus_n_latent_frames(frames, f_t, t):
    model = tiny(frames=frames, temporal_downsample=f_t)
    assert model.grid == model.cfg.grid == (t, 4, 4)
    clips = torch.rand(2, 1, frames, 16, 16)
    recon, ids, loss, latents = model(clips)
    assert recon.shape == clips.shape and ids.shape == (2, t, 4, 4) and latents.shape == (2, 3, t, 4, 4)
    assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 60 and loss.item() == 0.0
    assert model.decode(ids).shape == clips.shape


def test_encode_decode_shapes_and_clear_errors():
    model = tiny(in_channels=3)
    clips = torch.rand(2, 3, 9, 16, 16)
    ids = model.encode(clips)
    assert ids.shape == (2, 3, 4, 4) and model.codebook_size == 60
    recon = model.decode(ids)
    assert recon.shape == clips.shape and 0 <= recon.min() and recon.max() <= 1
    assert torch.equal(model(clips)[1], ids)
    with pytest.raises(ValueError, match=r"expected clips of shape \[B, 3, 9, 16, 16\], got \[2, 3, 8, 16, 16\]"):
        model.encode(clips[:, :, :8])
    with pytest.raises(ValueError, match=r"expected clips of shape \[B, 3, 9, 16, 16\], got \[2, 3, 16, 16\]"):
        model(clips[:, :, 0])
    with pytest.raises(ValueError, match=r"expected clips of shape \[B, 3, 1 \+ 4\*n, 16, 16\], got \[2, 3, 6, 16, 16\]"):
        model.encode_latents(clips[:, :, :6])
    with pytest.raises(ValueError, match=r"expected code ids of shape \[B, 3, 4, 4\], got \[2, 2, 4, 4\]"):
        model.decode(ids[:, :2])


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny().train()
    recon, _, _, _ = model(torch.rand(2, 1, 9, 16, 16))
    recon.mean().backward()
    assert isinstance(model.quantizer, FSQ)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_vq_quantizer_option():
    model = tiny(quantizer="vq", vq_codebook_size=32, vq_code_dim=6).train()
    assert isinstance(model.quantizer, VectorQuantizer) and model.codebook_size == 32
    recon, ids, loss, latents = model(torch.rand(2, 1, 9, 16, 16))
    assert latents.shape == (2, 6, 3, 4, 4) and ids.shape == (2, 3, 4, 4) and ids.max() < 32 and loss.item() > 0
    (recon.mean() + loss).backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert model.decode(model.encode(torch.rand(1, 1, 9, 16, 16))).shape == (1, 1, 9, 16, 16)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"frames must be 1 \+ 4 \* n"):
        CausalTokenizerConfig(**{**TINY, "frames": 8})
    with pytest.raises(ValueError, match="power of two"):
        CausalTokenizerConfig(**{**TINY, "temporal_downsample": 3})
    with pytest.raises(ValueError, match="needs 3 stride-2 stages"):
        CausalTokenizerConfig(**{**TINY, "temporal_downsample": 8, "frames": 9})
    with pytest.raises(ValueError, match="not divisible"):
        CausalTokenizerConfig(**{**TINY, "image_size": 18})
    with pytest.raises(ConfigError, match="valid: fsq, vq"):
        CausalTokenizerConfig(**{**TINY, "quantizer": "lfq"})
    with pytest.raises(ValueError, match="uint16"):
        CausalTokenizerConfig(**{**TINY, "fsq_levels": [16, 16, 16, 16, 2]})


def test_registry_builds_it_and_config_grid_matches_model():
    model = build_tokenizer("causal3d", TINY)
    assert isinstance(model, CausalVideoTokenizer)
    assert token_grid("causal3d", TINY) == model.grid == (3, 4, 4)
    assert tokenizer_config("causal3d", TINY).codebook_size == model.codebook_size == 60


@pytest.mark.parametrize(
    ("name", "grid", "codebook_size"), [("moving_fmnist_causal3d", (5, 8, 8), 128), ("causal3d_paper", (5, 16, 16), 1000)]
)
def test_config_files(name, grid, codebook_size):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.kind == "causal3d" and {"optim", "codebook", "trainer", "checkpoint_every", "name", "dir"} <= set(cfg)
    config = tokenizer_config(cfg.kind, OmegaConf.to_container(cfg.model))
    assert config.grid == grid and config.codebook_size == codebook_size


class RandomClips(MediaLoaders):
    """A media datamodule of random uint8 clips ``[1, 5, 16, 16]`` (the tokenizer stage only needs the seam)."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.batch_size, self.num_workers = 4, 0
        clips = torch.randint(0, 256, (n, 1, 5, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        self.data = TensorDataset(clips, torch.arange(n) % 2)

    def dataset(self, split: str) -> TensorDataset:
        return self.data


def test_tokenizer_module_trains_the_causal_tokenizer_on_clips(tmp_path):
    """The Lightning stage is kind-agnostic: it trains on uint8 clips, reports PSNR and usage, writes a reconstruction GIF."""
    module = TokenizerModule(model={**TINY, "frames": 5, "image_size": 16}, kind="causal3d", grid_images=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, accelerator="cpu", default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    datamodule = RandomClips()
    trainer.fit(module, datamodule=datamodule)
    (metrics,) = trainer.test(module, datamodule=datamodule)
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert {"test/psnr", "test/codebook_usage", "test/perplexity", "test/recon_loss"} <= set(metrics)
    assert 0 < metrics["test/codebook_usage"] <= 1 and metrics["test/psnr"] > 0
    assert (tmp_path / "reconstructions" / "test.gif").is_file()
    assert (tmp_path / "reconstructions" / "test_frames.png").is_file()
