"""Nested sub-model m_p is exactly a dense transformer of residual width D/p built from the sliced weights."""

import math

import pytest
import torch
from torch import nn

from conftest import CONF_DIR, compose_config
from magnets.choices import MODEL_SIZES, load_model_sizes
from magnets.cli import check_model
from magnets.errors import ConfigError
from magnets.models.transformer import NestedTransformer, TransformerConfig
from magnets.pipeline import maskgit_model_config

CFG = dict(codebook_size=20, grid=[12], num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48, widths=[8, 4, 2, 1])


class DenseBlock(nn.Module):
    """A plain pre-norm block with residual width d, attention width D and MLP width M."""

    def __init__(self, d, attn_dim, heads, mlp_dim):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * attn_dim)
        self.attn_out = nn.Linear(attn_dim, d)
        self.mlp_in, self.mlp_out = nn.Linear(d, mlp_dim), nn.Linear(mlp_dim, d)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # explicit attention, not SDPA
        x = x + self.attn_out((weights @ v).transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp_out(nn.functional.gelu(self.mlp_in(self.norm2(x))))


def dense_copy(model: NestedTransformer, p: int) -> nn.Module:
    """A standalone dense transformer of residual width D/p holding m_p's sliced weights."""
    cfg = model.cfg
    d = cfg.dim // p

    def copy_linear(src, rows=slice(None), cols=slice(None)):
        dst = nn.Linear(src.weight[rows, cols].shape[1], src.weight[rows, cols].shape[0])
        dst.weight.data.copy_(src.weight[rows, cols])
        dst.bias.data.copy_(src.bias[rows])
        return dst

    def copy_norm(src):
        dst = nn.LayerNorm(d)
        dst.weight.data.copy_(src.weight[:d])
        dst.bias.data.copy_(src.bias[:d])
        return dst

    blocks = []
    for src in model.blocks:
        block = DenseBlock(d, cfg.dim, cfg.heads, cfg.mlp_dim)
        block.norm1, block.norm2 = copy_norm(src.norm1), copy_norm(src.norm2)
        block.qkv = copy_linear(src.qkv, cols=slice(0, d))
        block.attn_out = copy_linear(src.attn_out, rows=slice(0, d))
        block.mlp_in = copy_linear(src.mlp_in, cols=slice(0, d))
        block.mlp_out = copy_linear(src.mlp_out, rows=slice(0, d))
        blocks.append(block)
    token_emb = model.token_emb.weight[:, :d].detach().clone()
    class_emb = model.class_emb.weight[:, :d].detach().clone()
    pos_emb = model.pos_emb[:, :d].detach().clone()
    norm, head = copy_norm(model.norm), copy_linear(model.head, cols=slice(0, d))

    class Dense(nn.Module):
        def forward(self, tokens, labels):
            x = token_emb[tokens] + pos_emb[None] + class_emb[labels][:, None]
            for block in blocks:
                x = block(x)
            return head(norm(x))

    return Dense()


@pytest.mark.parametrize("p", [8, 4, 2, 1])
def test_sub_model_equals_dense_transformer_of_sliced_weights(p):
    torch.manual_seed(0)
    model = NestedTransformer(TransformerConfig(**CFG))
    with torch.no_grad():  # non-trivial norms and biases, so slicing mistakes show
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    tokens = torch.randint(0, 21, (3, 12))
    labels = torch.randint(0, 6, (3,))
    expected = dense_copy(model, p)(tokens, labels)
    assert torch.allclose(model(tokens, labels, width=p), expected, atol=1e-5, rtol=1e-5)
    if p == 1:  # the full model: every parameter entry is used
        assert all(w.shape[-1] == 32 for w in (model.token_emb.weight, model.pos_emb))


def test_loss_of_m8_gives_zero_gradient_outside_its_slices():
    torch.manual_seed(0)
    model = NestedTransformer(TransformerConfig(**CFG))
    tokens, labels = torch.randint(0, 21, (4, 12)), torch.randint(0, 6, (4,))
    logits = model(tokens, labels, width=8)
    nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 20, (48,))).backward()
    d = 32 // 8
    outside = {  # parameter -> the part m_8 never touches
        "token_emb.weight": (slice(None), slice(d, None)),
        "class_emb.weight": (slice(None), slice(d, None)),
        "pos_emb": (slice(None), slice(d, None)),
        "norm.weight": (slice(d, None),),
        "norm.bias": (slice(d, None),),
        "head.weight": (slice(None), slice(d, None)),
    }
    for i in range(2):
        outside |= {
            f"blocks.{i}.norm1.weight": (slice(d, None),),
            f"blocks.{i}.norm1.bias": (slice(d, None),),
            f"blocks.{i}.norm2.weight": (slice(d, None),),
            f"blocks.{i}.norm2.bias": (slice(d, None),),
            f"blocks.{i}.qkv.weight": (slice(None), slice(d, None)),
            f"blocks.{i}.attn_out.weight": (slice(d, None),),
            f"blocks.{i}.attn_out.bias": (slice(d, None),),
            f"blocks.{i}.mlp_in.weight": (slice(None), slice(d, None)),
            f"blocks.{i}.mlp_out.weight": (slice(d, None),),
            f"blocks.{i}.mlp_out.bias": (slice(d, None),),
        }
    grads = {name: param.grad for name, param in model.named_parameters()}
    for name, grad in grads.items():
        if name in outside:
            assert grad[outside[name]].abs().max() == 0, name
            inside = torch.ones_like(grad, dtype=torch.bool)
            inside[outside[name]] = False
            assert grad[inside].abs().max() > 0, name
        else:  # qkv/mlp_in biases and other full-width outputs are read by m_8
            assert grad.abs().max() > 0, name


def test_unknown_width_and_indivisible_sizes_name_the_valid_values():
    model = NestedTransformer(TransformerConfig(**CFG))
    with pytest.raises(ValueError, match=r"unknown width 3; configured widths: \[8, 4, 2, 1\]"):
        model(torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, dtype=torch.long), width=3)
    with pytest.raises(ValueError, match=r"dim=36 is not divisible by width factors \[8\]"):
        TransformerConfig(**{**CFG, "dim": 36})
    sizes = r"\['tiny', 'fmnist', 'fmnist_paper', 's', 'b', 'l', 'xl'\]"
    with pytest.raises(ValueError, match=rf"unknown model size 'm'; valid: {sizes}"):
        TransformerConfig.from_size("m", codebook_size=8, grid=[4], num_classes=2)


def test_model_sizes_are_read_from_the_model_yamls_and_overrides_reach_the_model(tmp_path):
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == sorted(MODEL_SIZES)
    assert MODEL_SIZES["b"] == {"dim": 768, "depth": 24, "heads": 16, "mlp_dim": 3072}  # MaskGIT's base transformer
    for size, dims in MODEL_SIZES.items():
        assert dims["dim"] // dims["heads"] >= 48, size
        TransformerConfig.from_size(size, codebook_size=512, grid=[64], num_classes=10)
    # A model group is what the training builds: its YAML values, and a command-line override of them.
    cfg = compose_config(["model=fmnist", "model.depth=3", "model.mlp_dim=256", f"paths.runs={tmp_path}"])
    built = maskgit_model_config(cfg)
    assert {k: built[k] for k in ("dim", "depth", "heads", "mlp_dim")} == {"dim": 128, "depth": 3, "heads": 2, "mlp_dim": 256}
    cfg.model.heads = 3
    with pytest.raises(ConfigError, match=r"model.heads=3 is not valid; valid: a divisor of model.dim=128"):
        check_model(cfg.model)
    cfg.model.heads, cfg.model.depth = 2, 0
    with pytest.raises(ConfigError, match=r"model.depth=0 is not valid; valid: a positive integer"):
        check_model(cfg.model)


def test_a_model_yaml_without_its_dimensions_is_refused_by_name(tmp_path):
    (tmp_path / "half.yaml").write_text("size: half\ndim: 64\nwidths: [8, 4, 2, 1]\n")
    with pytest.raises(ValueError, match=r"half.yaml: a model size needs size and dim, depth, heads, mlp_dim"):
        load_model_sizes(tmp_path)
