"""The MaskGIT ImageNet VQGAN tokenizer: the public weights file's key layout, loading it, shapes, the code rule."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from magnets.errors import MismatchError, MissingFileError
from magnets.models.maskgit_vqgan import (
    MASKGIT_VQGAN_WEIGHTS,
    MaskGITVQGAN,
    MaskGITVQGANConfig,
    load_maskgit_vqgan_weights,
)
from magnets.models.tokenizer import Tokenizer, build_tokenizer, token_grid

FIXTURE = Path(__file__).parent / "fixtures" / "maskgit_vqgan_keys.tsv"
SMALL = {"base_channels": 8, "channel_mult": [1, 2, 2], "image_size": 32, "code_dim": 8, "codebook_size": 16, "norm_groups": 4}


def fixture_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the public weights file, in the file's order."""
    shapes = {}
    for line in FIXTURE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            shapes[name] = tuple(int(d) for d in shape.split(","))
    return shapes


def meta_model(**overrides: object) -> MaskGITVQGAN:
    with torch.device("meta"):
        return MaskGITVQGAN(MaskGITVQGANConfig(**overrides))


def test_default_state_dict_is_the_public_file_layout():
    expected = fixture_shapes()
    assert len(expected) == 168 and expected["quantize.embedding.weight"] == (1024, 256)
    got = {k: tuple(v.shape) for k, v in meta_model().state_dict().items()}
    assert list(got.items()) == list(expected.items())
    assert sum(v.numel() for v in meta_model().parameters()) == 54_515_587


def test_a_file_of_the_public_layout_loads_into_the_default_model(tmp_path):
    # Stride-0 tensors of the fixture's shapes keep the file tiny; loading copies them out in full.
    state = {name: torch.full((1,), float(i)).expand(shape) for i, (name, shape) in enumerate(fixture_shapes().items())}
    path = tmp_path / MASKGIT_VQGAN_WEIGHTS
    torch.save(state, path)
    model = meta_model().to_empty(device="cpu").train()
    assert load_maskgit_vqgan_weights(model, path) is model and not model.training
    assert torch.all(model.quantize.embedding.weight == len(state) - 1)
    assert torch.all(model.encoder.conv_in.weight == 0)


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.2 for k, v in MaskGITVQGAN(MaskGITVQGANConfig(**SMALL)).state_dict().items()}


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_small_file_loads_and_gives_the_same_codes(tmp_path, wrapper):
    state = small_state()
    path = tmp_path / "w.bin"
    torch.save(state if wrapper is None else {wrapper: state, "step": 3}, path)
    model = load_maskgit_vqgan_weights(MaskGITVQGAN(MaskGITVQGANConfig(**SMALL)), path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    reference = MaskGITVQGAN(MaskGITVQGANConfig(**SMALL)).eval()
    reference.load_state_dict(state)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.encode(images), reference.encode(images))


def test_missing_extra_and_misshapen_keys_are_refused_by_name(tmp_path):
    model = MaskGITVQGAN(MaskGITVQGANConfig(**SMALL))
    state = small_state()
    del state["decoder.conv_out.bias"]
    state["decoder.attn.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "keys.bin")
    with pytest.raises(MismatchError) as err:
        load_maskgit_vqgan_weights(model, tmp_path / "keys.bin")
    message = str(err.value)
    assert "keys.bin" in message and "1 missing keys: decoder.conv_out.bias" in message
    assert "1 unexpected keys: decoder.attn.weight" in message

    state = small_state()
    state["quantize.embedding.weight"] = torch.zeros(32, 8)
    torch.save(state, tmp_path / "shape.bin")
    with pytest.raises(
        MismatchError, match=r"1 shape mismatches: quantize\.embedding\.weight \(file \[32, 8\], model \[16, 8\]\)"
    ):
        load_maskgit_vqgan_weights(model, tmp_path / "shape.bin")

    # A file of the real layout into a small model: counts, and only the first ten names of a kind.
    torch.save({k: torch.zeros(1) for k in fixture_shapes()}, tmp_path / "real.bin")
    with pytest.raises(MismatchError, match=r"168 shape mismatches: encoder\.conv_in\.weight .*, \.\.\.") as err:
        load_maskgit_vqgan_weights(
            MaskGITVQGAN(MaskGITVQGANConfig(**{**SMALL, "channel_mult": [1, 1, 2, 2, 4]})), tmp_path / "real.bin"
        )
    assert str(err.value).count("(file [1]") == 10


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    model = MaskGITVQGAN(MaskGITVQGANConfig(**SMALL))
    with pytest.raises(MissingFileError, match=r"nope\.bin does not exist"):
        load_maskgit_vqgan_weights(model, tmp_path / "nope.bin")
    (tmp_path / "text.bin").write_text("not a torch file")
    with pytest.raises(MismatchError, match=r"cannot read MaskGIT VQGAN weights file .*text\.bin") as err:
        load_maskgit_vqgan_weights(model, tmp_path / "text.bin")
    # one line, and never torch's advice to run the file's code (weights_only=False)
    assert "weights_only" not in str(err.value) and len(str(err.value).splitlines()) == 1
    pickle_of_code = tmp_path / "code.bin"
    with open(pickle_of_code, "wb") as f:
        pickle.dump({"w": object}, f)
    with pytest.raises(MismatchError, match=r"code\.bin as a torch state dict: not a plain tensor file \(Unsupported"):
        load_maskgit_vqgan_weights(model, pickle_of_code)
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(MismatchError, match="holds a list, not a state dict"):
        load_maskgit_vqgan_weights(model, tmp_path / "list.bin")


def test_default_model_encodes_256_images_to_16x16_codes_and_back():
    model = build_tokenizer("maskgit_vqgan", {}).eval()
    assert isinstance(model, Tokenizer) and model.grid == (16, 16) and model.codebook_size == 1024
    assert token_grid("maskgit_vqgan", {}) == (16, 16)
    ids = model.encode(torch.rand(1, 3, 256, 256))
    assert ids.shape == (1, 16, 16) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 1024
    images = model.decode(ids)
    assert images.shape == (1, 3, 256, 256) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_encode_picks_the_code_at_least_squared_l2_distance(monkeypatch):
    model = MaskGITVQGAN(MaskGITVQGANConfig(**{**SMALL, "code_dim": 2, "codebook_size": 4})).eval()
    codes = torch.tensor([[1.0, 0.0], [99.0, 0.0], [0.0, -3.0], [100.5, 0.0]])
    model.quantize.embedding.weight.data.copy_(codes)
    # Latents [1, 2, 4, 4]: each position a 2-vector; a cosine rule would tie codes 0, 1 and 3.
    wanted = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 1], [3, 3, 0, 2], [1, 2, 1, 0]])
    points = torch.tensor([[0.9, 0.1], [98.5, 0.0], [0.1, -2.0], [100.0, 0.0]])
    picks = {0: points[0], 1: points[1], 2: points[2], 3: points[3]}
    latents = torch.stack([torch.stack([picks[int(i)] for i in row]) for row in wanted]).permute(2, 0, 1)[None]  # [1, 2, 4, 4]
    monkeypatch.setattr(model.encoder, "forward", lambda images: latents)
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(model.encode(images), wanted[None])
    brute = ((latents[0].permute(1, 2, 0)[..., None, :] - codes) ** 2).sum(-1).argmin(-1)  # [4, 4]
    assert torch.equal(brute, wanted)
    # Under bf16 autocast the same codes: the distances are taken in float32
    # (in bf16, z.e near 10^4 rounds to multiples of 64, which would pick code 1 over code 3 for z = 100).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.encode(images), wanted[None])


def test_decode_embeds_the_ids_it_is_given(monkeypatch):
    model = MaskGITVQGAN(MaskGITVQGANConfig(**SMALL)).eval()
    seen = []
    monkeypatch.setattr(
        model.decoder, "forward", lambda codes: seen.append(codes) or codes.new_full((codes.shape[0], 3, 32, 32), 2.0)
    )
    ids = torch.randint(0, 16, (2, 8, 8))
    assert torch.equal(model.decode(ids), torch.ones(2, 3, 32, 32))  # clamped
    assert torch.equal(seen[0], model.quantize.embedding.weight[ids].permute(0, 3, 1, 2))


def test_bad_shapes_and_configs_are_clear_errors():
    model = MaskGITVQGAN(MaskGITVQGANConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 32\], got \[2, 3, 64, 64\]"):
        model.encode(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected code ids of shape \[B, 8, 8\], got \[8, 8\]"):
        model.decode(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer code ids"):
        model.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="image_size=100 is not divisible by the downsampling factor 16"):
        MaskGITVQGANConfig(image_size=100)
    with pytest.raises(ValueError, match=r"norm_groups=32 does not divide the widths \[8, 8, 16, 16\] \(base_channels=8"):
        MaskGITVQGANConfig(base_channels=8)
    with pytest.raises(ValueError, match="uint16"):
        MaskGITVQGANConfig(codebook_size=70000)
    with pytest.raises(ValueError, match="channel_mult must list"):
        MaskGITVQGANConfig(channel_mult=[])
    with pytest.raises(ValueError, match="num_res_blocks must be at least 1, got 0"):
        MaskGITVQGANConfig(num_res_blocks=0)
    cfg = MaskGITVQGANConfig()
    assert cfg.downsample_factor == 16 and cfg.grid == (16, 16)
