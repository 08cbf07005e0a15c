"""The static decode plan: every step's width, kind and shapes, known before the first step.

How many tokens each step reveals depends only on the number of masked
tokens, K and the mask schedule (``decode_masked_counts``), and whether a
step refreshes the cache depends only on the widths and the cache mode
(``step_kind``). So for a schedule, cache mode, grid and task (the tokens a
task gives), the whole decode is known in advance: each step's width, how
many tokens run through the model (``queries``), how many cached entries
they attend to besides themselves (``cached``), and where the output head
runs (``head_positions``). The planned fast path (``magnets.decoding.fast``)
allocates its buffers once from the plan and runs every step with static
shapes; the FLOP accounting reads its work from the plan without decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from magnets.choices import CACHE_MODES, POLICY_CACHE_MODES
from magnets.masking import decode_masked_counts


@dataclass(frozen=True)
class StepWork:
    """What one decode step computed, per batch row: all the FLOPs formula needs."""

    width: int
    kind: str  # "full" (uncached pass), "refresh" (full pass that rebuilds the cache), "cached" or "partial"
    queries: int  # tokens run through the layers
    keys: int  # keys/values each query attends to
    head_positions: int  # positions where the output head runs (the masked ones)
    rows: int  # batch rows run: samples, twice that with classifier-free guidance
    first_layer: int = 0  # the layers run are first_layer .. end_layer - 1 ...
    end_layer: int = -1  # ... where -1 means through the last layer (a partial refresh runs two ranges)


def check_cache_mode(mode: str, refresh_every: int = 1) -> None:
    """Raise, naming the valid values, on an unknown cache mode or a non-positive refresh period."""
    if mode not in CACHE_MODES + POLICY_CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; valid: {list(CACHE_MODES + POLICY_CACHE_MODES)}")
    if mode == "refresh_every_n" and refresh_every < 1:
        raise ValueError(f"refresh_every must be a positive number of steps, got {refresh_every}")


def step_kind(mode: str, step: int, width: int, previous_width: int | None, steps_since_refresh: int, refresh_every: int) -> str:
    """``full``, ``refresh``, ``partial`` or ``cached``: what a step of cache ``mode`` runs (the one home of this rule)."""
    if mode == "none":
        return "full"
    if step == 0:
        return "refresh"
    switched = width != previous_width
    if mode == "refresh_from_layer" and switched:
        return "partial"
    if mode == "refresh_on_switch" and switched:
        return "refresh"
    if mode == "refresh_every_n" and (switched or steps_since_refresh >= refresh_every):
        return "refresh"
    return "cached"


@dataclass(frozen=True)
class StepPlan:
    """One planned step, per sample.

    A ``full`` (uncached) or ``refresh`` step runs all N tokens; a ``cached``
    step runs the ``just_revealed`` tokens of the previous step first, then
    the ``masked_before`` still-masked ones, against ``cached`` entries.
    """

    step: int
    width: int
    kind: str  # "full", "refresh" or "cached" (``step_kind``)
    masked_before: int  # masked tokens when the step starts: the head runs at these positions
    masked_after: int  # masked tokens the step leaves
    queries: int  # tokens run through every layer
    cached: int  # cache entries the queries attend to besides themselves (0 unless cached)
    just_revealed: int  # cached steps: tokens revealed at the previous step, the first queries

    @property
    def keys(self) -> int:
        """Keys/values each query attends to."""
        return self.cached + self.queries

    @property
    def reveal(self) -> int:
        return self.masked_before - self.masked_after

    @property
    def shape(self) -> tuple[int, str, int, int, int]:
        """What fixes the shapes of the step's forward: (width, kind, queries, cached, head positions)."""
        return (self.width, self.kind, self.queries, self.cached, self.masked_before)

    def work(self, rows: int) -> StepWork:
        """The step's :class:`StepWork` for ``rows`` batch rows."""
        return StepWork(self.width, self.kind, self.queries, self.keys, self.masked_before, rows)


@dataclass(frozen=True)
class DecodePlan:
    """Every step of one decode of ``num_masked`` of ``num_tokens`` tokens, in order."""

    num_tokens: int
    num_masked: int
    cache: str
    guided: bool
    steps: tuple[StepPlan, ...]

    @property
    def width_per_step(self) -> list[int]:
        return [s.width for s in self.steps]

    def rows(self, samples: int) -> int:
        """Batch rows the model runs for ``samples`` samples: twice as many with guidance."""
        return 2 * samples if self.guided else samples

    def work(self, samples: int = 1) -> list[StepWork]:
        """The work of every step of a decode of ``samples`` samples: what the decoder reports, step for step."""
        return [s.work(self.rows(samples)) for s in self.steps]

    def distinct_shapes(self) -> list[tuple[int, str, int, int, int]]:
        """The distinct step shapes in order of first use: what a graph-captured decode captures once each."""
        return list(dict.fromkeys(s.shape for s in self.steps))


def plan_decode(
    num_tokens: int,
    width_per_step: Sequence[int],
    cache: str,
    refresh_every: int = 2,
    mask_schedule: str = "cosine",
    guided: bool = False,
    num_masked: int | None = None,
) -> DecodePlan:
    """The plan of a decode of ``num_masked`` (default: all) of ``num_tokens`` tokens over ``width_per_step``.

    The tokens not masked (frame prediction's given frames) are revealed from
    the first step: a refresh caches them, a cached step never runs them.
    """
    check_cache_mode(cache, refresh_every)
    if cache in POLICY_CACHE_MODES:
        raise ValueError(f"cache mode {cache!r} has no static plan (it runs eagerly); planned modes: {list(CACHE_MODES)}")
    num_masked = num_tokens if num_masked is None else num_masked
    if not 1 <= num_masked <= num_tokens:
        raise ValueError(f"num_masked must lie in [1, {num_tokens}], got {num_masked}")
    masked_before = [num_masked, *decode_masked_counts(num_masked, len(width_per_step), mask_schedule)]
    steps, previous_width, since_refresh = [], None, 0
    for step, width in enumerate(width_per_step):
        kind = step_kind(cache, step, width, previous_width, since_refresh, refresh_every)
        if kind == "cached":
            # The tokens masked before the previous step: the ones it revealed, then the ones still masked.
            queries = masked_before[step - 1]
            cached, just_revealed = num_tokens - queries, masked_before[step - 1] - masked_before[step]
        else:
            queries, cached, just_revealed = num_tokens, 0, 0
        steps.append(StepPlan(step, width, kind, masked_before[step], masked_before[step + 1], queries, cached, just_revealed))
        previous_width, since_refresh = width, 1 if kind == "refresh" else since_refresh + 1
    return DecodePlan(num_tokens, num_masked, cache, guided, tuple(steps))
