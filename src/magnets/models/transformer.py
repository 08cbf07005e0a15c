"""Nested bidirectional MaskGIT transformer: one set of weights, sub-models m_p of residual width D/p.

m_p (``width=p``) carries the first ``D/p`` channels of the residual stream:
embeddings and every LayerNorm are sliced to their first ``D/p`` entries;
layers that read the stream (q/k/v, MLP-in, output head) use the first
``D/p`` input columns ``W[:, :D/p]`` and still produce the full attention
width and MLP hidden size; layers that write to the stream (attention-out,
MLP-out) produce only the first ``D/p`` outputs ``W[:D/p, :]``. Every
weight-matrix product of m_p costs 1/p of m_1's; attention runs at full
width, so keys and values have the same shape at every width: a key/value
cache written at one width can be read at another (``magnets.decoding.cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from magnets.choices import MODEL_SIZES
from magnets.models.tokenizer import num_tokens

if TYPE_CHECKING:
    from magnets.decoding.cache import KVCache


@dataclass
class TransformerConfig:
    """Architecture of the nested transformer.

    Token ids ``0 .. codebook_size-1`` are codes, ``codebook_size`` is [MASK];
    labels ``0 .. num_classes-1`` are classes, ``num_classes`` is the null
    class used for classifier-free guidance.
    """

    codebook_size: int
    grid: list[int]  # the tokenizer's token grid: (h, w) or (t, h, w)
    num_classes: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    widths: list[int] = field(default_factory=lambda: [8, 4, 2, 1])

    def __post_init__(self) -> None:
        self.grid = [int(g) for g in self.grid]  # a plain list whatever came in (tuple, ListConfig)
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"grid must list positive sides, got {self.grid}")
        bad = [p for p in self.widths if p < 1 or self.dim % p]
        if bad:
            raise ValueError(f"dim={self.dim} is not divisible by width factors {bad}; widths must divide dim: {self.widths}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        # Usually [8, 4, 2, 1]; a single width p < 1 trains m_p alone (the distillation ablation's baseline), its
        # weights beyond the first D/p channels unused.
        if not self.widths or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct width factors, e.g. [8, 4, 2, 1]; got {self.widths}")

    @classmethod
    def from_size(cls, size: str, **fields: Any) -> TransformerConfig:
        """The registered ``size`` (see ``MODEL_SIZES``) with data-dependent ``fields``."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; valid: {list(MODEL_SIZES)}")
        return cls(**cast(dict[str, Any], MODEL_SIZES[size]), **fields)

    @property
    def num_tokens(self) -> int:
        """Tokens per item: the product of the grid's sides."""
        return num_tokens(self.grid)

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    def stream_width(self, width: int) -> int:
        """Residual channels of sub-model m_width: ``dim / width``."""
        if width not in self.widths:
            raise ValueError(f"unknown width {width!r}; configured widths: {self.widths}")
        return self.dim // width


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to the first ``x.shape[-1]`` channels only."""
    d = x.shape[-1]
    return F.layer_norm(x, (d,), norm.weight[:d], norm.bias[:d], norm.eps)


def read_stream(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A layer reading the stream: first ``d`` input columns, every output."""
    return F.linear(x, linear.weight[:, : x.shape[-1]], linear.bias)


def write_stream(linear: nn.Linear, x: torch.Tensor, d: int) -> torch.Tensor:
    """A layer writing the stream: every input, first ``d`` outputs."""
    return F.linear(x, linear.weight[:d], linear.bias[:d])


class Block(nn.Module):
    """Pre-norm transformer block whose stream width is a call argument."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.attn_out = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp_in = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.mlp_out = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``x`` ``[B, Q, d]`` -> ``[B, Q, d]``, where ``d`` is the sub-model's stream width.

        Without ``cache`` the Q tokens attend to each other. With it, their
        keys/values are written after the cached entries of ``layer`` and they
        attend to the cache and to each other.
        """
        return self.forward_groups([x], cache, layer)[0]

    def forward_groups(self, streams: list[torch.Tensor], cache: KVCache | None = None, layer: int = 0) -> list[torch.Tensor]:
        """One pass over token groups of different widths: ``[B, Q_g, d_g]`` each -> the same shapes.

        Each group's LayerNorms and projections use its own ``d_g`` channels;
        their queries, keys and values all have the full attention width, so
        the groups attend jointly, in the order listed (group 0's tokens first
        in the pass, then group 1's, ...). One group is :meth:`forward`.
        """
        b = streams[0].shape[0]
        qkv_groups = [read_stream(self.qkv, layer_norm(self.norm1, x)) for x in streams]  # [B, Q_g, 3D] each
        qkv = qkv_groups[0] if len(qkv_groups) == 1 else torch.cat(qkv_groups, dim=1)  # [B, Q, 3D]
        n = qkv.shape[1]
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x [B, Q, D]
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, Q, D/H]
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # [B, H, cached + Q, D/H]
        attn = F.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).reshape(b, n, -1)  # [B, Q, D]
        outputs, start = [], 0
        for x in streams:
            count, d = x.shape[1], x.shape[2]
            group_attn = attn if len(streams) == 1 else attn[:, start : start + count]  # [B, Q_g, D]
            x = x + write_stream(self.attn_out, group_attn, d)
            hidden = read_stream(self.mlp_in, layer_norm(self.norm2, x))  # [B, Q_g, mlp_dim] at every width
            # Without autograd, GELU in place: at small widths allocating another [B, Q, mlp_dim] costs as much as
            # the product.
            hidden = F.gelu(hidden) if torch.is_grad_enabled() else torch.ops.aten.gelu_(hidden)
            outputs.append(x + write_stream(self.mlp_out, hidden, d))
            start += count
        return outputs


class NestedTransformer(nn.Module):
    """Class-conditional masked-token predictor; ``model(tokens, labels, width=p)`` -> logits ``[B, N, V]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.codebook_size + 1, cfg.dim)  # + [MASK]
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + null class
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.dim))  # a learned entry per grid cell, row-major
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, tokens: torch.Tensor, labels: torch.Tensor, d: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position + class embeddings, first ``d`` channels: ``[B, Q]`` -> ``[B, Q, d]``.

        ``positions`` ``[B, Q]`` are the grid positions of ``tokens``; None means ``0 .. Q-1``.
        """
        token = self.token_emb.weight[tokens, :d]  # [B, Q, d]
        if positions is None:
            position = self.pos_emb[None, : tokens.shape[1], :d]  # [1, Q, d]
        else:
            position = self.pos_emb[positions, :d]  # [B, Q, d]
        label = self.class_emb.weight[labels, None, :d]  # [B, 1, d]
        return token + position + label

    def hidden(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        width: int,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final residual stream ``[B, Q, D/width]`` of m_width for tokens ``[B, Q]`` at ``positions``.

        With ``cache``, the tokens also attend to the cached keys/values of
        every layer and their own keys/values are written after them (see
        ``KVCache.extend``).
        """
        x = self.embed(tokens, labels, self.cfg.stream_width(width), positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return x

    def run_layers(self, streams: list[torch.Tensor], layers: range, cache: KVCache | None = None) -> list[torch.Tensor]:
        """Token groups of any widths (``[B, Q_g, d_g]`` each) through the blocks in ``layers``, in one pass each.

        With every layer and one group of embedded tokens this is :meth:`hidden`;
        the decode policies of ``magnets.decoding.policies`` run groups of
        different widths together and stop or start at a layer.
        """
        for layer in layers:
            streams = cast(Block, self.blocks[layer]).forward_groups(streams, cache, layer)
        return streams

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, Q, V]`` from a final residual stream ``[B, Q, d]`` of any width."""
        return read_stream(self.head, layer_norm(self.norm, hidden))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, width: int) -> torch.Tensor:
        """Logits ``[B, N, V]`` of sub-model m_width for token ids ``[B, N]`` and labels ``[B]``."""
        if tokens.shape[1] != self.cfg.num_tokens:
            raise ValueError(f"expected {self.cfg.num_tokens} tokens per item, got {tokens.shape[1]}")
        return self.head_logits(self.hidden(tokens, labels, width))
