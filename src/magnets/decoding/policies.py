"""Decode policies beyond one width per step: token groups of different widths in one pass, partial cache refresh.

The nested model's queries, keys, values and MLP hidden have the full width
whatever the stream width, so tokens of different widths can share one pass
(``Block.forward_groups``): each group runs its own projections, attention is
joint. :class:`PolicyLogits` is the decode loop's tokens-to-logits callable
for these policies:

- **routing** (``RouteSettings``): which tokens of a pass run narrower than
  the step's width. ``confidence``: the masked tokens the previous step was
  least sure of (its largest log-probability per position) run at
  ``route_width``; the ``fraction`` most confident ones, and never fewer than
  the step will reveal (so the last step runs every token wide), at the
  step's width.
  ``context``: the revealed tokens a pass runs (all of them in a full or a
  refresh pass; the ones revealed at the previous step in a cached pass)
  run at ``route_width``, the masked ones at the step's width.
- **partial refresh** (cache mode ``refresh_from_layer``): on a width
  switch, recompute the cached keys/values of layers ``refresh_layer ..
  depth-1`` only. The pass runs the new queries (the tokens revealed at the
  previous step and the masked ones) through the layers below against the
  cache, as a cached step does; at layer ``refresh_layer`` every token joins
  it, the cached ones with the residual stream they had entering that layer
  when last computed (at their narrower width; the channels they never had
  are zero), and the layers above run over all N tokens and rewrite their
  cache entries. From layer 0 that is ``refresh_on_switch``; from layer
  ``depth`` it is ``no_refresh``.

Each pass reports one :class:`StepWork` per token group (and per layer range),
so the FLOP formula counts every group at its own width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from magnets.choices import POLICY_CACHE_MODES, REVEALS, ROUTES
from magnets.decoding.cache import KVCache, build_tokens_to_logits, gather_rows, positions_where
from magnets.decoding.loop import SamplingSettings, TokensToLogits
from magnets.decoding.plan import StepWork, check_cache_mode, step_kind
from magnets.masking import decode_masked_counts
from magnets.models.transformer import NestedTransformer


@dataclass(frozen=True)
class RouteSettings:
    """Which tokens of a pass run at a narrower width than the step's (``decode.route*``)."""

    route: str = "none"  # none | confidence | context
    width: int = 8  # the narrow width factor; a step never runs a token wider than its own width
    fraction: float = 0.5  # confidence: the share of masked tokens kept at the step's width (rounded up; at least the
    # tokens the step reveals, when the callable knows the decode's steps)
    reveal: str = "any"  # confidence: any | wide (only the tokens run at the step's width may be revealed)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}; valid: {list(ROUTES)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"route fraction must lie in (0, 1], got {self.fraction}")
        if self.width < 1:
            raise ValueError(f"route width must be a width factor >= 1, got {self.width}")
        if self.reveal not in REVEALS:
            raise ValueError(f"unknown route reveal {self.reveal!r}; valid: {list(REVEALS)}")


def narrower(width: int, other: int) -> int:
    """The narrower of two width factors (m_8 is narrower than m_1)."""
    return max(width, other)


@dataclass
class TokenGroup:
    """Tokens of one pass at one width: grid ``positions`` ``[B, Q_g]``; the output head runs from ``head_from`` on."""

    positions: torch.Tensor
    width: int
    head_from: int

    @property
    def count(self) -> int:
        return self.positions.shape[1]

    @property
    def head_count(self) -> int:
        return self.count - self.head_from


def merge_groups(groups: list[TokenGroup]) -> list[TokenGroup]:
    """Drop empty groups; join neighbours of one width when the head positions stay the tail of the joined group."""
    merged: list[TokenGroup] = []
    for group in (g for g in groups if g.count):
        last = merged[-1] if merged else None
        if last is not None and last.width == group.width and (last.head_count == 0 or group.head_from == 0):
            head_from = last.count + group.head_from if last.head_count == 0 else last.head_from
            merged[-1] = TokenGroup(torch.cat([last.positions, group.positions], dim=1), group.width, head_from)
        else:
            merged.append(group)
    return merged


class PolicyLogits:
    """Tokens-to-logits for routed widths and partial refresh; one decode at a time (``step == 0`` starts one).

    ``cache``: any mode of ``CACHE_MODES`` or ``refresh_from_layer`` (with
    ``refresh_layer`` in ``[0, depth]``). Routing and partial refresh do not
    combine. ``steps`` and ``mask_schedule`` (the decode's K and mask schedule)
    give confidence routing each step's reveal count, its floor of wide tokens.
    Returns the logits at the masked positions in ascending order, as every
    tokens-to-logits callable does, and a list of :class:`StepWork`.
    """

    def __init__(
        self,
        model: NestedTransformer,
        cache: str = "refresh_on_switch",
        refresh_every: int = 2,
        refresh_layer: int = 0,
        route: RouteSettings | None = None,
        steps: int | None = None,
        mask_schedule: str = "cosine",
    ) -> None:
        check_cache_mode(cache, refresh_every)
        self.route = route or RouteSettings()
        depth = model.cfg.depth
        if cache == "refresh_from_layer":
            if not 0 <= refresh_layer <= depth:
                raise ValueError(f"refresh_layer must lie in [0, depth={depth}], got {refresh_layer}")
            if self.route.route != "none":
                raise ValueError(f"route {self.route.route!r} does not combine with cache refresh_from_layer; use one of them")
        if self.route.route != "none" and self.route.width not in model.cfg.widths:
            raise ValueError(f"route width {self.route.width} is not a width of the model; configured: {model.cfg.widths}")
        self.model, self.mode, self.refresh_every, self.refresh_layer = model, cache, refresh_every, refresh_layer
        self.cache = KVCache(depth, model.cfg.num_tokens)
        self.previous_masked: torch.Tensor | None = None
        self.previous_width: int | None = None
        self.steps_since_refresh = 0
        self.next_step = 0
        self.scores: torch.Tensor | None = None  # [B, N]: the last step's largest log-probability per masked position
        self.stream_at_layer: torch.Tensor | None = None  # [B, N, D]: refresh_from_layer's stream entering that layer
        self.groups: list[TokenGroup] = []  # the last pass's token groups, in pass order (for inspection)
        self.steps, self.mask_schedule = steps, mask_schedule
        self.reveals: list[int] = []  # tokens each step reveals, known at step 0 when ``steps`` is given
        self.wide: torch.Tensor | None = None  # [B, M]: the masked positions the last pass ran wide (None: all)

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, width: int, step: int) -> tuple[torch.Tensor, list[StepWork]]:
        """Logits ``[B, M, V]`` at the masked positions of ``tokens`` ``[B, N]`` (ascending), and the step's work."""
        if step != self.next_step and step != 0:
            raise ValueError(f"policy decoding runs steps in order from 0: expected step 0 or {self.next_step}, got {step}")
        masked = tokens == self.model.cfg.mask_id  # [B, N]
        if step == 0:
            self.scores = self.stream_at_layer = None
            if self.steps is not None:
                masked_before = [
                    int(masked[0].sum()),
                    *decode_masked_counts(int(masked[0].sum()), self.steps, self.mask_schedule),
                ]
                self.reveals = [a - b for a, b in zip(masked_before, masked_before[1:], strict=False)]
        kind = step_kind(self.mode, step, width, self.previous_width, self.steps_since_refresh, self.refresh_every)
        previous_masked = masked if self.previous_masked is None else self.previous_masked  # None only at step 0
        if kind in ("cached", "partial") and previous_masked.shape != masked.shape:
            raise ValueError(f"the batch changed shape mid-decode: {tuple(previous_masked.shape)} -> {tuple(masked.shape)}")
        masked_positions = positions_where(masked)  # [B, M]
        if kind in ("full", "refresh"):
            context = positions_where(~masked)  # [B, R]: every revealed token
        else:
            context = positions_where(previous_masked & ~masked)  # [B, R]: the ones revealed at the previous step
        if kind == "partial":
            logits, work = self._partial(tokens, labels, width, masked, context, masked_positions)
        else:
            reveal = self.reveals[step] if step < len(self.reveals) else 0
            self.wide = None
            groups = self.groups = merge_groups(self._route(width, context, masked_positions, reveal))
            logits, work = self._grouped(tokens, labels, kind, groups, masked_positions)
        if self.route.route == "confidence":
            best = torch.log_softmax(logits.float(), dim=-1).amax(dim=-1)  # [B, M]
            self.scores = torch.full(masked.shape, -math.inf, device=tokens.device).scatter_(1, masked_positions, best)
        self.previous_masked, self.previous_width = masked, width
        self.steps_since_refresh = 1 if kind in ("refresh", "partial") else self.steps_since_refresh + 1
        self.next_step = step + 1
        return logits, work

    def revealable(self) -> torch.Tensor | None:
        """With ``reveal="wide"``: the masked positions (ascending, ``[B, M]``) the last pass ran at the step's width,
        the only ones the step may reveal (the decode loop's ``revealable``); None otherwise."""
        return self.wide if self.route.reveal == "wide" else None

    def _route(self, width: int, context: torch.Tensor, masked_positions: torch.Tensor, reveal: int) -> list[TokenGroup]:
        """The pass's token groups in pass order: the revealed context first, then the masked tokens (``reveal``: how
        many of them the step reveals, the floor of the wide ones; 0 when unknown)."""
        narrow = narrower(width, self.route.width)
        context_width = narrow if self.route.route == "context" else width
        groups = [TokenGroup(context, context_width, head_from=context.shape[1])]
        m = masked_positions.shape[1]
        keep = min(m, max(math.ceil(self.route.fraction * m), reveal))
        if self.route.route != "confidence" or self.scores is None or narrow == width or keep == m:
            return groups + [TokenGroup(masked_positions, width, head_from=0)]
        scores = self.scores.gather(1, masked_positions)  # [B, M]
        order = scores.argsort(dim=1, descending=True, stable=True)  # most confident first
        self.wide = torch.zeros_like(masked_positions, dtype=torch.bool).scatter_(1, order[:, :keep], True)  # [B, M]
        confident = masked_positions.gather(1, order[:, :keep].sort(dim=1).values)  # [B, keep], ascending
        unsure = masked_positions.gather(1, order[:, keep:].sort(dim=1).values)  # [B, M - keep], ascending
        return groups + [TokenGroup(confident, width, head_from=0), TokenGroup(unsure, narrow, head_from=0)]

    def _grouped(
        self, tokens: torch.Tensor, labels: torch.Tensor, kind: str, groups: list[TokenGroup], masked_positions: torch.Tensor
    ) -> tuple[torch.Tensor, list[StepWork]]:
        """One pass over ``groups`` (a full, refresh or cached step); logits at the masked positions, ascending."""
        model, cfg = self.model, self.model.cfg
        b, masked_count = tokens.shape[0], masked_positions.shape[1]
        if len(groups) == 1 and kind in ("full", "refresh"):
            return self._grid_pass(tokens, labels, kind, groups[0].width, masked_positions)
        context_count = sum(g.count for g in groups) - masked_count  # revealed tokens run, all before the masked ones
        streams = [
            model.embed(tokens.gather(1, g.positions), labels, cfg.stream_width(g.width), g.positions) for g in groups
        ]  # [B, Q_g, d_g] each
        cache = None if kind == "full" else self.cache
        cached = 0 if kind != "cached" else self.cache.length
        if kind == "refresh":
            self.cache.begin_refresh(torch.arange(context_count, device=tokens.device).expand(b, -1))  # context first
        keep = groups[0].positions[:, :context_count] if self.mode == "refresh_from_layer" else None
        streams = self._layers(streams, cache, keep)
        if kind == "refresh":
            self.cache.end_refresh()
        elif kind == "cached":
            self.cache.keep(context_count)
        head_groups = [(g, s[:, g.head_from :]) for g, s in zip(groups, streams, strict=True) if g.head_count]
        logits = torch.cat([model.head_logits(s) for _, s in head_groups], dim=1)  # [B, M, V] in group order
        positions = torch.cat([g.positions[:, g.head_from :] for g, _ in head_groups], dim=1)  # [B, M]
        ascending = positions.argsort(dim=1)  # [B, M]
        logits = logits.gather(1, ascending[:, :, None].expand(-1, -1, logits.shape[-1]))
        queries = sum(g.count for g in groups)
        keys = cfg.num_tokens if kind in ("full", "refresh") else cached + queries
        return logits, [StepWork(g.width, kind, g.count, keys, g.head_count, b) for g in groups]

    def _grid_pass(
        self, tokens: torch.Tensor, labels: torch.Tensor, kind: str, width: int, masked_positions: torch.Tensor
    ) -> tuple[torch.Tensor, list[StepWork]]:
        """All N tokens at one width in grid order: the uncached or refresh pass of ``magnets.decoding.cache``."""
        model, cfg = self.model, self.model.cfg
        b, n = tokens.shape
        cache = None if kind == "full" else self.cache
        if kind == "refresh":
            self.cache.begin_refresh(positions_where(tokens != cfg.mask_id))  # grid order: pass index = position
        keep = torch.arange(n, device=tokens.device).expand(b, -1) if self.mode == "refresh_from_layer" else None
        (stream,) = self._layers([model.embed(tokens, labels, cfg.stream_width(width))], cache, keep)  # [B, N, d]
        if kind == "refresh":
            self.cache.end_refresh()
        logits = model.head_logits(gather_rows(stream, masked_positions))
        return logits, [StepWork(width, kind, n, n, masked_positions.shape[1], b)]

    def _layers(self, streams: list[torch.Tensor], cache: KVCache | None, keep: torch.Tensor | None) -> list[torch.Tensor]:
        """Every layer over the groups; with ``keep`` (grid positions ``[B, R]`` of the pass's first R tokens, which
        join the cache) ``refresh_from_layer`` stores their stream entering its layer."""
        depth = self.model.cfg.depth
        if keep is None:
            return self.model.run_layers(streams, range(depth), cache)
        streams = self.model.run_layers(streams, range(self.refresh_layer), cache)
        (stream,) = streams  # no routing with refresh_from_layer: one group of the step's width
        self._keep_stream(keep, stream[:, : keep.shape[1]])
        return self.model.run_layers(streams, range(self.refresh_layer, depth), cache)

    def _keep_stream(self, positions: torch.Tensor, stream: torch.Tensor) -> None:
        """Store ``stream`` ``[B, R, d]`` at grid ``positions`` ``[B, R]``; the channels beyond ``d`` become zero."""
        b, n, dim = positions.shape[0], self.model.cfg.num_tokens, self.model.cfg.dim
        if self.stream_at_layer is None or self.stream_at_layer.shape[0] != b or self.stream_at_layer.dtype != stream.dtype:
            self.stream_at_layer = stream.new_zeros(b, n, dim)
        padded = torch.nn.functional.pad(stream, (0, dim - stream.shape[-1]))  # [B, R, D]
        self.stream_at_layer.scatter_(1, positions[:, :, None].expand(-1, -1, dim), padded)

    def _partial(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        width: int,
        masked: torch.Tensor,
        just_revealed: torch.Tensor,
        masked_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, list[StepWork]]:
        """A width switch under ``refresh_from_layer``: the layers below against the cache, the ones above over all N."""
        model, cfg, layer = self.model, self.model.cfg, self.refresh_layer
        b, n, d = tokens.shape[0], cfg.num_tokens, cfg.stream_width(width)
        query_positions = torch.cat([just_revealed, masked_positions], dim=1)  # [B, Q]
        queries, cached = query_positions.shape[1], self.cache.length
        (stream,) = model.run_layers(
            [model.embed(tokens.gather(1, query_positions), labels, d, query_positions)], range(layer), self.cache
        )  # [B, Q, d]
        if layer == 0:
            full = model.embed(tokens, labels, d)  # [B, N, d]: the embeddings need no stored stream
        else:
            assert self.stream_at_layer is not None  # written by the refresh pass of step 0
            full = self.stream_at_layer[:, :, :d].clone()  # [B, N, d]
        full.scatter_(1, query_positions[:, :, None].expand(-1, -1, d), stream)
        self._keep_stream(torch.arange(n, device=tokens.device).expand(b, -1), full)
        self.cache.begin_refresh(positions_where(~masked))  # every revealed token, at its grid position
        (full,) = model.run_layers([full], range(layer, cfg.depth), self.cache)  # [B, N, d]
        self.cache.end_refresh()
        logits = model.head_logits(gather_rows(full, masked_positions))
        work = [StepWork(width, "partial", n, n, masked_positions.shape[1], b, first_layer=layer)]
        if layer > 0:
            work.insert(0, StepWork(width, "partial", queries, cached + queries, 0, b, end_layer=layer))
        return logits, work


def build_decode_callables(
    model: NestedTransformer,
    settings: SamplingSettings,
    cache: str,
    refresh_every: int = 2,
    *,
    refresh_layer: int = 0,
    route: RouteSettings | None = None,
    compile: bool = False,
    fast: bool = False,
    width_per_step: Sequence[int] | None = None,
) -> tuple[TokensToLogits, TokensToLogits | None]:
    """The decode loop's tokens-to-logits callable and, when guidance runs apart, the unconditional one.

    A routed decode or a ``POLICY_CACHE_MODES`` cache runs :class:`PolicyLogits`
    (eagerly: ``fast`` and ``compile`` are refused there); everything else is
    ``build_tokens_to_logits``. The unconditional callable (``settings.separate_unconditional``)
    has its own cache and no routing.
    """
    route = route or RouteSettings()
    policy = route.route != "none" or cache in POLICY_CACHE_MODES
    if policy and (fast or compile):
        raise ValueError(
            f"decode.fast and decode.compile run the planned cache modes without routing; got route={route.route!r}, "
            f"cache={cache!r}: set decode.fast=false decode.compile=false"
        )
    if policy:
        steps = None if width_per_step is None else len(width_per_step)
        conditional: TokensToLogits = PolicyLogits(
            model, cache, refresh_every, refresh_layer, route, steps=steps, mask_schedule=settings.mask_schedule
        )
    else:
        conditional = build_tokens_to_logits(
            model, cache, refresh_every, compile=compile, fast=fast, width_per_step=width_per_step,
            mask_schedule=settings.mask_schedule,
        )  # fmt: skip
    if not settings.separate_unconditional:
        return conditional, None
    if cache in POLICY_CACHE_MODES:
        return conditional, PolicyLogits(model, cache, refresh_every, refresh_layer)
    return conditional, build_tokens_to_logits(model, cache, refresh_every)


def route_settings(decode_cfg: Mapping[str, Any]) -> RouteSettings:
    """The routing of a ``decode`` config group (``route``, ``route_width``, ``route_fraction``)."""
    return RouteSettings(
        str(decode_cfg["route"]), int(decode_cfg["route_width"]), float(decode_cfg["route_fraction"]),
        str(decode_cfg["route_reveal"]),
    )  # fmt: skip


def policy_label(decode_cfg: Mapping[str, Any]) -> str:
    """What a ``decode`` group sets beyond one width per step and batched guidance, e.g.
    ``route=confidence:8:0.5`` or ``refresh_layer=6,guidance_width=8``; empty when nothing (the results' ``policy``)."""
    parts = []
    if decode_cfg["route"] != "none":
        fraction = f":{float(decode_cfg['route_fraction']):g}" if decode_cfg["route"] == "confidence" else ""
        if decode_cfg["route"] == "confidence" and decode_cfg["route_reveal"] != "any":
            fraction += f":{decode_cfg['route_reveal']}"
        parts.append(f"route={decode_cfg['route']}:{decode_cfg['route_width']}{fraction}")
    if decode_cfg["cache"] in POLICY_CACHE_MODES:
        parts.append(f"refresh_layer={decode_cfg['refresh_layer']}")
    if float(decode_cfg["guidance_scale"]) > 0:
        parts += [f"{key}={decode_cfg[key]}" for key in ("guidance_width", "guidance_steps") if int(decode_cfg[key]) > 0]
    return ",".join(parts)


def policy_slug(label: str) -> str:
    """A :func:`policy_label` as a file-name part: ``route=confidence:8:0.5`` -> ``_route-confidence-8-0.5``; empty stays."""
    return "_" + label.replace("=", "-").replace(":", "-").replace(",", "_") if label else ""
