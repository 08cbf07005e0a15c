"""Analytic FLOPs of the nested transformer (2 FLOPs per multiply-add)."""

from __future__ import annotations

from collections.abc import Sequence

from magnets.decoding.plan import StepWork
from magnets.models.transformer import TransformerConfig


def forward_flops(
    cfg: TransformerConfig,
    width: int,
    queries: int,
    keys: int | None = None,
    head_positions: int | None = None,
    layers: int | None = None,
) -> int:
    """FLOPs of one forward pass of sub-model m_width for one sample.

    ``queries`` tokens run through every layer and attend to ``keys``
    keys/values (default: ``queries``); logits are computed at
    ``head_positions`` positions (default: ``queries``). Weight products
    scale with the stream width ``d = dim / width``; attention itself runs at
    the full width ``dim`` whatever the sub-model. Norms, softmax, GELU and
    embedding look-ups are left out (under 1% at these sizes). ``layers``
    (default: every one) is how many of the blocks the queries run through.
    """
    keys = queries if keys is None else keys
    head_positions = queries if head_positions is None else head_positions
    d, D, M = cfg.stream_width(width), cfg.dim, cfg.mlp_dim
    weights_per_query = 2 * (d * 3 * D + D * d + d * M + M * d)  # qkv, attention out, MLP in, MLP out
    attention = 2 * 2 * queries * keys * D  # scores Q K^T and the weighted sum of V
    layers = cfg.depth if layers is None else layers
    return layers * (queries * weights_per_query + attention) + 2 * head_positions * d * cfg.codebook_size


def work_flops(cfg: TransformerConfig, work: StepWork) -> int:
    """FLOPs of one :class:`StepWork` record, all its rows."""
    end = cfg.depth if work.end_layer < 0 else work.end_layer
    return forward_flops(cfg, work.width, work.queries, work.keys, work.head_positions, end - work.first_layer) * work.rows


def nested_training_flop_ratio(cfg: TransformerConfig) -> float:
    """Forward FLOPs of all configured widths over the full model's alone, on full sequences."""
    n = cfg.num_tokens
    return sum(forward_flops(cfg, p, n) for p in cfg.widths) / forward_flops(cfg, 1, n)


def decode_flops_per_sample(cfg: TransformerConfig, work: Sequence[StepWork], samples: int) -> float:
    """FLOPs per generated sample of the decode steps in ``work`` (rows include guidance's second branch)."""
    total = sum(work_flops(cfg, w) for w in work)
    return total / samples
