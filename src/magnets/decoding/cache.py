"""Key/value caching across the parallel decoding steps, and the tokens-to-logits callables of the decode loop.

The decode loop (``magnets.decoding.loop.decode``) calls ``tokens_to_logits(tokens,
labels, width, step)`` once per step and gets the logits at the still-masked
positions (ascending) plus a :class:`StepWork` record of what that step ran.
:class:`UncachedLogits` runs a full pass over all N tokens every step;
:class:`CachedLogits` keeps, per layer, the keys/values of revealed tokens:

- a *refresh* step (the first step, and by mode a width switch or every n
  steps) runs all N tokens, revealed ones with their token ids and masked ones
  as [MASK], and rebuilds the cache from the revealed tokens' keys/values;
- a *cached* step runs only the tokens revealed at the previous step (they
  have no cache entry yet) and the still-masked ones; they attend to the
  cache and to each other, and afterwards the previously revealed tokens'
  keys/values join the cache.

Keys/values have the full attention width at every sub-model width, so an
entry written by m_8 can be read by m_1 (``no_refresh``: the approximation
the paper ablates). In a one-layer model an entry depends only on its token's
embedding and the width that wrote it, so within one width the cache is
never stale — the property the tests use to check this bookkeeping.

:class:`PlannedLogits` is the fast path: the same model calls on the same
values, driven by the decode's static plan (``magnets.decoding.plan``). Its
positions come from a sort whose counts the plan gives (no host
synchronisation), its cache is allocated once per plan and batch and reused
by later decodes, and on CUDA each step can be captured into a CUDA graph
(``magnets.decoding.graphs``) and replayed. It reveals exactly the tokens
the eager callables reveal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from magnets.decoding.graphs import CapturedStep
from magnets.decoding.plan import DecodePlan, StepPlan, StepWork, check_cache_mode, plan_decode, step_kind
from magnets.models.transformer import NestedTransformer

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


def positions_where(mask: torch.Tensor) -> torch.Tensor:
    """Ascending positions ``[B, C]`` of the True entries of ``mask`` ``[B, N]``; every row must hold C of them."""
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"every row of a decode batch must have the same number of masked tokens, got {counts.tolist()}: "
            "decode rows with different numbers of pre-revealed tokens in separate batches"
        )
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)  # row-major nonzero: [B, C], ascending per row


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b]]``: ``[B, N, d]``, ``[B, C]`` -> ``[B, C, d]``."""
    return x.gather(1, positions[:, :, None].expand(-1, -1, x.shape[-1]))


def masked_first(mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, N]``: the True entries of ``mask`` ``[B, N]`` first, then the others, each in ascending order.

    A stable sort: unlike ``nonzero`` it needs no host synchronisation.
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices


def ascending_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions ``[B, count]`` of the True entries of ``mask`` ``[B, N]``; each row holds exactly ``count``."""
    return masked_first(mask)[:, :count]


class KVCache:
    """Keys/values of revealed tokens for every layer; rows of the batch are independent.

    Buffers ``[depth, B, H, N, D/H]`` hold the cached entries in slots
    ``[0, length)``. A cached pass writes its tokens' keys/values to the slots
    after them (:meth:`extend`) and :meth:`keep` then admits the first few of
    those. A refresh pass (between :meth:`begin_refresh` and
    :meth:`end_refresh`) runs all N tokens and stores only the revealed ones.
    """

    def __init__(self, depth: int, num_tokens: int) -> None:
        self.depth, self.num_tokens = depth, num_tokens
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.refresh_positions: torch.Tensor | None = None  # [B, R] during a refresh pass

    def begin_refresh(self, revealed_positions: torch.Tensor) -> None:
        """The next pass runs all N tokens in grid order; keep the keys/values at ``revealed_positions`` ``[B, R]``."""
        self.length = 0
        self.refresh_positions = revealed_positions

    def end_refresh(self) -> None:
        assert self.refresh_positions is not None
        self.length = self.refresh_positions.shape[1]
        self.refresh_positions = None

    # Writes into preallocated buffers (gather with out=), which torch.compile cannot trace with dynamic shapes:
    # a compiled forward runs this part eagerly and compiles what lies between.
    @torch.compiler.disable
    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a pass's ``keys``/``values`` ``[B, H, Q, D/H]``; return what its queries attend to.

        In a refresh pass that is the inputs themselves, exactly as in an
        uncached pass; otherwise the cache followed by the inputs.
        """
        b, h, q, dh = keys.shape
        if self.keys is None or self.keys.shape[1:3] != (b, h) or self.keys.dtype != keys.dtype:
            shape = (self.depth, b, h, self.num_tokens, dh)
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
        assert self.values is not None
        if self.refresh_positions is not None:
            r = self.refresh_positions.shape[1]
            index = self.refresh_positions[:, None, :, None].expand(b, h, r, dh)  # [B, H, R, D/H]
            torch.gather(keys, 2, index, out=self.keys[layer, :, :, :r])
            torch.gather(values, 2, index, out=self.values[layer, :, :, :r])
            return keys, values
        end = self.length + q
        if end > self.num_tokens:
            raise ValueError(f"a pass of {q} tokens after {self.length} cached ones exceeds the {self.num_tokens} slots")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def keep(self, count: int) -> None:
        """Admit the first ``count`` tokens of the last cached pass (written after the cached ones)."""
        self.length += count


class UncachedLogits:
    """Tokens-to-logits without a cache: every step a full pass over all N tokens.

    The output head runs at the masked positions only, as in the cached
    decoder, so the baseline does no work it does not need.
    """

    def __init__(self, model: NestedTransformer) -> None:
        self.model = model
        self.hidden = model.hidden  # build_tokens_to_logits(compile=True) swaps in the compiled function

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, width: int, step: int) -> tuple[torch.Tensor, StepWork]:
        """Logits ``[B, M, V]`` at the masked positions of ``tokens`` ``[B, N]`` (ascending), and the step's work."""
        masked_positions = positions_where(tokens == self.model.cfg.mask_id)  # [B, M]
        hidden = self.hidden(tokens, labels, width)  # [B, N, d]
        logits = self.model.head_logits(gather_rows(hidden, masked_positions))
        b, n = tokens.shape
        return logits, StepWork(width, "full", queries=n, keys=n, head_positions=masked_positions.shape[1], rows=b)


class CachedLogits:
    """Tokens-to-logits with a key/value cache; one decode at a time (``step == 0`` starts a new one).

    ``mode``: ``refresh_on_switch`` (refresh at the first step and whenever
    the width changes), ``no_refresh`` (refresh at the first step only; a new
    width reads the entries an earlier width wrote), ``refresh_every_n``
    (refresh at every switch and after ``refresh_every`` steps without one).
    """

    def __init__(self, model: NestedTransformer, mode: str = "refresh_on_switch", refresh_every: int = 2) -> None:
        check_cache_mode(mode, refresh_every)
        if mode == "none":
            raise ValueError("cache mode 'none' is UncachedLogits; use build_tokens_to_logits")
        self.model, self.mode, self.refresh_every = model, mode, refresh_every
        self.hidden = model.hidden  # build_tokens_to_logits(compile=True) swaps in the compiled function
        self.cache = KVCache(model.cfg.depth, model.cfg.num_tokens)
        self.previous_masked: torch.Tensor | None = None
        self.previous_width: int | None = None
        self.steps_since_refresh = 0
        self.next_step = 0

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, width: int, step: int) -> tuple[torch.Tensor, StepWork]:
        """Logits ``[B, M, V]`` at the masked positions of ``tokens`` ``[B, N]`` (ascending), and the step's work."""
        if step != self.next_step and step != 0:
            raise ValueError(f"cached decoding runs steps in order from 0: expected step 0 or {self.next_step}, got {step}")
        masked = tokens == self.model.cfg.mask_id  # [B, N]
        kind = step_kind(self.mode, step, width, self.previous_width, self.steps_since_refresh, self.refresh_every)
        if kind == "cached":
            assert self.previous_masked is not None
            if self.previous_masked.shape != masked.shape:
                raise ValueError(
                    f"the batch changed shape mid-decode: {tuple(self.previous_masked.shape)} -> {tuple(masked.shape)}"
                )
        logits, work = (self._refresh if kind == "refresh" else self._cached)(tokens, labels, width, masked)
        self.previous_masked, self.previous_width = masked, width
        self.steps_since_refresh = 1 if kind == "refresh" else self.steps_since_refresh + 1
        self.next_step = step + 1
        return logits, work

    def _refresh(
        self, tokens: torch.Tensor, labels: torch.Tensor, width: int, masked: torch.Tensor
    ) -> tuple[torch.Tensor, StepWork]:
        """Full pass in grid order; the cache keeps the revealed tokens' keys/values."""
        masked_positions = positions_where(masked)  # [B, M]
        self.cache.begin_refresh(positions_where(~masked))
        hidden = self.hidden(tokens, labels, width, cache=self.cache)  # [B, N, d]
        self.cache.end_refresh()
        logits = self.model.head_logits(gather_rows(hidden, masked_positions))
        b, n = tokens.shape
        return logits, StepWork(width, "refresh", queries=n, keys=n, head_positions=masked_positions.shape[1], rows=b)

    def _cached(
        self, tokens: torch.Tensor, labels: torch.Tensor, width: int, masked: torch.Tensor
    ) -> tuple[torch.Tensor, StepWork]:
        """Run the tokens revealed at the previous step, then the masked ones, against the cache."""
        assert self.previous_masked is not None
        just_revealed = positions_where(self.previous_masked & ~masked)  # [B, R]
        masked_positions = positions_where(masked)  # [B, M]
        query_positions = torch.cat([just_revealed, masked_positions], dim=1)  # [B, R + M]
        query_tokens = tokens.gather(1, query_positions)
        cached = self.cache.length
        hidden = self.hidden(query_tokens, labels, width, positions=query_positions, cache=self.cache)  # [B, R + M, d]
        revealed = just_revealed.shape[1]
        self.cache.keep(revealed)
        logits = self.model.head_logits(hidden[:, revealed:])  # the masked positions only
        b, q = query_positions.shape
        return logits, StepWork(width, "cached", queries=q, keys=cached + q, head_positions=masked_positions.shape[1], rows=b)


class PlannedState:
    """What one (plan, batch rows) keeps across decodes: the cache in static storage and the captured steps."""

    def __init__(self, plan: DecodePlan, depth: int) -> None:
        self.plan = plan
        self.cache = KVCache(depth, plan.num_tokens)
        self.captured: dict[int, CapturedStep] = {}  # step -> its graph
        self.pool: _POOL_HANDLE | None = None


class PlannedLogits:
    """Tokens-to-logits that follows the plan of a decode over ``width_per_step``; one decode at a time.

    The plan is made at step 0 from the number of masked tokens (the task's
    given tokens are revealed from the start) and kept, with its buffers,
    for every later decode that starts with as many masked tokens and rows.
    ``graphs`` captures the steps into CUDA graphs (CUDA only).
    """

    def __init__(
        self,
        model: NestedTransformer,
        width_per_step: Sequence[int],
        cache: str = "refresh_on_switch",
        refresh_every: int = 2,
        mask_schedule: str = "cosine",
        graphs: bool = False,
    ) -> None:
        check_cache_mode(cache, refresh_every)
        self.model, self.width_per_step = model, list(width_per_step)
        self.cache_mode, self.refresh_every, self.mask_schedule = cache, refresh_every, mask_schedule
        self.graphs = graphs
        self.hidden = model.hidden  # build_tokens_to_logits(compile=True) swaps in the compiled function
        self.states: dict[tuple[int, int], PlannedState] = {}
        self.state: PlannedState | None = None
        self.previous_masked: torch.Tensor | None = None
        self.next_step = 0

    def plan_for(self, num_masked: int) -> DecodePlan:
        return plan_decode(
            self.model.cfg.num_tokens, self.width_per_step, self.cache_mode, self.refresh_every, self.mask_schedule,
            num_masked=num_masked,
        )  # fmt: skip

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, width: int, step: int) -> tuple[torch.Tensor, StepWork]:
        """Logits ``[B, M, V]`` at the masked positions of ``tokens`` ``[B, N]`` (ascending), and the step's work."""
        masked = tokens == self.model.cfg.mask_id  # [B, N]
        if step == 0:
            key = (int(masked[0].sum()), tokens.shape[0])  # the one host read of a decode
            if key not in self.states:
                self.states[key] = PlannedState(self.plan_for(key[0]), self.model.cfg.depth)
            self.state = self.states[key]
        elif step != self.next_step:
            raise ValueError(f"planned decoding runs steps in order from 0: expected step 0 or {self.next_step}, got {step}")
        assert self.state is not None
        planned = self.state.plan.steps[step] if step < len(self.state.plan.steps) else None
        if planned is None or planned.width != width:
            expected = None if planned is None else planned.width
            raise ValueError(f"step {step} runs width {width} but the plan has {expected}: {self.state.plan.width_per_step}")
        if planned.kind == "cached":
            assert self.previous_masked is not None
            just_revealed = ascending_positions(self.previous_masked & ~masked, planned.just_revealed)  # [B, R]
            query_positions = torch.cat([just_revealed, ascending_positions(masked, planned.masked_before)], dim=1)
            inputs = (tokens.gather(1, query_positions), labels, query_positions)  # [B, R + M] each
        else:
            order = masked_first(masked)  # [B, N]: the masked positions, then the revealed ones
            inputs = (tokens, labels, order)
        logits = self._run(planned, inputs)
        self.previous_masked, self.next_step = masked, step + 1
        return logits, planned.work(tokens.shape[0])

    def _forward(self, planned: StepPlan) -> Callable[..., torch.Tensor]:
        """The step's computation over its inputs: the eager callables' model calls, with the plan's counts."""
        assert self.state is not None
        cache, width, masked = self.state.cache, planned.width, planned.masked_before

        def full(tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
            if planned.kind == "refresh":
                cache.begin_refresh(order[:, masked:])  # the revealed positions, ascending
            hidden = self.hidden(tokens, labels, width, cache=cache if planned.kind == "refresh" else None)  # [B, N, d]
            if planned.kind == "refresh":
                cache.end_refresh()
            return self.model.head_logits(gather_rows(hidden, order[:, :masked]))

        def cached(tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            cache.length = planned.cached
            hidden = self.hidden(tokens, labels, width, positions=positions, cache=cache)  # [B, R + M, d]
            return self.model.head_logits(hidden[:, planned.just_revealed :])  # the masked positions only

        return cached if planned.kind == "cached" else full

    def _run(self, planned: StepPlan, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not (self.graphs and inputs[0].is_cuda):
            return self._forward(planned)(*inputs)
        state = self.state
        assert state is not None
        if planned.step not in state.captured:
            state.captured[planned.step] = CapturedStep(self._forward(planned), inputs, state.pool)
            state.pool = state.pool or state.captured[planned.step].graph.pool()
        return state.captured[planned.step](*inputs)


def build_tokens_to_logits(
    model: NestedTransformer,
    cache: str,
    refresh_every: int = 2,
    compile: bool = False,
    fast: bool = False,
    width_per_step: Sequence[int] | None = None,
    mask_schedule: str = "cosine",
) -> UncachedLogits | CachedLogits | PlannedLogits:
    """The decode loop's tokens-to-logits callable for cache mode ``cache`` (one of ``CACHE_MODES``).

    ``fast``: the planned path (:class:`PlannedLogits`) for a decode over
    ``width_per_step`` with ``mask_schedule``; on CUDA its steps are captured
    into CUDA graphs. ``compile`` runs the transformer's forward through
    ``torch.compile``: with dynamic shapes on the eager path (the number of
    queries changes from step to step), with static shapes on the planned one
    (one compilation per distinct step shape, then captured with the step).
    The first decode pays the compilation; later ones reuse it.
    """
    check_cache_mode(cache, refresh_every)
    if fast:
        if width_per_step is None:
            raise ValueError("the planned fast path needs the decode's width_per_step")
        return planned_tokens_to_logits(model, width_per_step, cache, refresh_every, mask_schedule, compile)
    tokens_to_logits = UncachedLogits(model) if cache == "none" else CachedLogits(model, cache, refresh_every)
    if compile:
        tokens_to_logits.hidden = compiled_hidden(model)
    return tokens_to_logits


def planned_tokens_to_logits(
    model: NestedTransformer,
    width_per_step: Sequence[int],
    cache: str,
    refresh_every: int,
    mask_schedule: str,
    compile: bool,
) -> PlannedLogits:
    """The model's :class:`PlannedLogits` for these settings, kept on the model and reused by later calls.

    Its plans, cache storage and captured CUDA graphs then serve every batch
    of an evaluation. Captured graphs read the weights where they were, so a
    new one is made when any parameter has moved (``.to()``, a swap of weights).
    """
    key = (cache, refresh_every, tuple(width_per_step), mask_schedule, compile)
    weights = tuple(param.data_ptr() for param in model.parameters())
    kept = model.__dict__.setdefault("_planned_logits", {})  # not a submodule: stays out of state_dict
    if key not in kept or kept[key][0] != weights:
        planned = PlannedLogits(model, width_per_step, cache, refresh_every, mask_schedule, graphs=True)
        if compile:
            planned.hidden = compiled_hidden(model, dynamic=False)
        kept[key] = (weights, planned)
    return kept[key][1]


def compiled_hidden(model: NestedTransformer, dynamic: bool = True):
    """``torch.compile(model.hidden)``, made once per model and kind of shapes and kept on it for every decode."""
    name = "_compiled_hidden" if dynamic else "_compiled_hidden_static"
    compiled = getattr(model, name, None)
    if compiled is None:
        compiled = torch.compile(model.hidden, dynamic=dynamic)
        object.__setattr__(model, name, compiled)  # not a submodule: stays out of state_dict
    return compiled
