"""Analytic FLOPs of the nested transformer (2 FLOPs per multiply-add)."""

from __future__ import annotations

from collections.abc import Sequence

from magnets.masking import decode_masked_counts
from magnets.models.kv_cache import StepWork, check_cache_mode, step_kind
from magnets.models.transformer import TransformerConfig


def forward_flops(
    cfg: TransformerConfig,
    width: int,
    queries: int,
    keys: int | None = None,
    head_positions: int | None = None,
) -> int:
    """FLOPs of one forward pass of sub-model m_width for one sample.

    ``queries`` tokens run through every layer and attend to ``keys``
    keys/values (default: ``queries``); logits are computed at
    ``head_positions`` positions (default: ``queries``). Weight products
    scale with the stream width ``d = dim / width``; attention itself runs at
    the full width ``dim`` whatever the sub-model. Norms, softmax, GELU and
    embedding look-ups are left out (under 1% at these sizes).
    """
    keys = queries if keys is None else keys
    head_positions = queries if head_positions is None else head_positions
    d, D, M = cfg.stream_width(width), cfg.dim, cfg.mlp_dim
    weights_per_query = 2 * (d * 3 * D + D * d + d * M + M * d)  # qkv, attention out, MLP in, MLP out
    attention = 2 * 2 * queries * keys * D  # scores Q K^T and the weighted sum of V
    return cfg.depth * (queries * weights_per_query + attention) + 2 * head_positions * d * cfg.codebook_size


def nested_training_flop_ratio(cfg: TransformerConfig) -> float:
    """Forward FLOPs of all configured widths over the full model's alone, on full sequences."""
    n = cfg.num_tokens
    return sum(forward_flops(cfg, p, n) for p in cfg.widths) / forward_flops(cfg, 1, n)


def decode_flops_per_sample(cfg: TransformerConfig, work: Sequence[StepWork], samples: int) -> float:
    """FLOPs per generated sample of the decode steps in ``work`` (rows include guidance's second branch)."""
    total = sum(forward_flops(cfg, w.width, w.queries, w.keys, w.head_positions) * w.rows for w in work)
    return total / samples


def planned_decode_work(
    cfg: TransformerConfig,
    width_per_step: Sequence[int],
    cache: str,
    refresh_every: int = 2,
    mask_schedule: str = "cosine",
    guided: bool = False,
    num_masked: int | None = None,
) -> list[StepWork]:
    """The work each step of a one-sample decode will do, without running it.

    Reveal counts do not depend on the data (``decode_masked_counts``), so
    neither does the work: this is what the decoder reports, step for step
    (a test holds the two equal). ``num_masked`` defaults to every token.
    """
    check_cache_mode(cache, refresh_every)
    n = cfg.num_tokens
    num_masked = n if num_masked is None else num_masked
    masked_before = [num_masked, *decode_masked_counts(num_masked, len(width_per_step), mask_schedule)]
    rows = 2 if guided else 1
    work, previous_width, since_refresh = [], None, 0
    for step, width in enumerate(width_per_step):
        kind = step_kind(cache, step, width, previous_width, since_refresh, refresh_every)
        # A cached step runs the tokens revealed at the previous step plus the still-masked ones, i.e. the
        # tokens masked before the previous step; they attend to all N (cache + themselves).
        queries = masked_before[step - 1] if kind == "cached" else n
        work.append(StepWork(width, kind, queries=queries, keys=n, head_positions=masked_before[step], rows=rows))
        previous_width, since_refresh = width, 1 if kind == "refresh" else since_refresh + 1
    return work
