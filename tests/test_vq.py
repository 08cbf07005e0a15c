import lightning as L
import pytest
import torch

from magnets.data.images import FashionMNISTDataModule
from magnets.lit.tokenizer import TokenizerModule, load_tokenizer
from magnets.models.vq import VQConfig, VQTokenizer

TINY = {"channels": [8, 8, 16], "num_res_blocks": 1, "code_dim": 8, "codebook_size": 64}


def test_encode_decode_shapes():
    model = VQTokenizer(VQConfig(**TINY)).eval()
    images = torch.rand(3, 1, 32, 32)
    ids = model.encode(images)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 64
    recon = model.decode(ids)
    assert recon.shape == (3, 1, 32, 32) and 0 <= recon.min() and recon.max() <= 1
    recon_fwd, ids_fwd, vq_loss, latents = model(images)
    assert torch.equal(ids_fwd, ids) and latents.shape == (3, 8, 8, 8) and vq_loss.ndim == 0


def test_downsampling_factor_follows_channels():
    cfg = VQConfig(channels=[8, 8, 8, 8], image_size=32)
    assert cfg.downsample_factor == 8 and cfg.grid == (4, 4)
    assert VQTokenizer(cfg).encode(torch.rand(1, 1, 32, 32)).shape == (1, 4, 4)


def test_bad_shapes_and_configs_are_clear_errors():
    model = VQTokenizer(VQConfig(**TINY))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 32, 32\], got \[2, 3, 32, 32\]"):
        model.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected code ids of shape \[B, 8, 8\]"):
        model.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        VQConfig(channels=[8, 8, 8], image_size=30)
    with pytest.raises(ValueError, match="uint16"):
        VQConfig(codebook_size=70000)


def test_dead_codes_are_restarted_on_encoder_outputs():
    model = VQTokenizer(VQConfig(**TINY))
    quantizer = model.quantizer
    counts = torch.zeros(64)
    counts[:4] = 10.0  # only codes 0..3 in use
    for _ in range(40):
        quantizer.update_usage(counts, decay=0.9)
    dead = quantizer.dead_codes(threshold=0.1)
    assert dead.tolist() == list(range(4, 64))
    replacements = torch.randn(len(dead), 8)
    quantizer.restart_codes(dead, replacements)
    assert torch.allclose(quantizer.normalized_codebook()[dead], torch.nn.functional.normalize(replacements, dim=1))
    assert len(quantizer.dead_codes(threshold=0.1)) == 0


def test_straight_through_gradient_reaches_encoder_and_codebook():
    model = VQTokenizer(VQConfig(**TINY))
    recon, _, vq_loss, _ = model(torch.rand(2, 1, 32, 32))
    (recon.mean() + vq_loss).backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.grad.abs().sum() > 0


def test_fast_dev_run_fit_on_tiny_subset(fake_fmnist):
    dm = FashionMNISTDataModule(fake_fmnist, val_size=20, batch_size=8, subset=16, search_debian=False)
    module = TokenizerModule(model=TINY, restart_every=1, content_size=28)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.encoder") for k in changed) and "model.quantizer.usage" in changed
    metrics = trainer.callback_metrics
    assert {"val/psnr", "val/codebook_usage", "val/perplexity", "val/recon_loss"} <= set(metrics)
    assert 0 < metrics["val/codebook_usage"] <= 1 and 1 <= metrics["val/perplexity"] <= 64


def test_load_tokenizer_round_trip_and_errors(tmp_path):
    module = TokenizerModule(model=TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_tokenizer(path)
    images = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.encode(images), module.model.eval().encode(images))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_tokenizer(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")
