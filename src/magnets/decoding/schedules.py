"""Decode-time model schedules: how many of the K decode steps each width runs, in order.

``widths (8, 4, 2, 1), steps (3, 3, 3, 3)`` runs m_8 for three steps, then
m_4, m_2 and m_1 ("scale up"); ``widths (1,), steps (12,)`` is plain MaskGIT.
Shipped schedules are the ``conf/schedule/`` files; the schedule search
builds its schedules from cut points (:func:`steps_from_cuts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

SCHEDULE_DIR = Path(__file__).resolve().parents[3] / "conf" / "schedule"  # the Hydra group `schedule`


@dataclass(frozen=True)
class ModelSchedule:
    """Steps per width, run in the order listed; widths with 0 steps are skipped."""

    name: str
    widths: tuple[int, ...]
    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.steps):
            raise ValueError(f"schedule {self.name!r}: widths {list(self.widths)} and steps {list(self.steps)} differ in length")
        if any(int(k) != k or k < 0 for k in self.steps):
            raise ValueError(f"schedule {self.name!r}: steps must be non-negative integers, got {list(self.steps)}")
        if self.total_steps < 1:
            raise ValueError(f"schedule {self.name!r}: steps {list(self.steps)} sum to 0; it needs at least one step")

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def width_per_step(self, configured_widths: Sequence[int], total_steps: int | None = None) -> list[int]:
        """The width of each of the K steps; checks the widths exist in the model and, if given, K."""
        unknown = [p for p in self.widths if p not in configured_widths]
        if unknown:
            raise ValueError(
                f"schedule {self.name!r} names widths {unknown} that the model does not have; configured widths: "
                f"{list(configured_widths)}"
            )
        if total_steps is not None and self.total_steps != total_steps:
            raise ValueError(
                f"schedule {self.name!r}: steps {list(self.steps)} sum to {self.total_steps}, expected K={total_steps}"
            )
        return [p for p, k in zip(self.widths, self.steps, strict=True) for _ in range(k)]


# conf/schedule/ entries that are templates rather than schedules: search.yaml's steps come from its cut points.
SCHEDULE_TEMPLATES = ("search",)


def shipped_schedules() -> list[str]:
    """Names of the schedules in ``conf/schedule/`` (the templates of :data:`SCHEDULE_TEMPLATES` left out)."""
    return sorted(path.stem for path in SCHEDULE_DIR.glob("*.yaml") if path.stem not in SCHEDULE_TEMPLATES)


def steps_from_cuts(total_steps: int, *cuts: int) -> list[int]:
    """Steps per width of a K-step schedule over ``len(cuts) + 1`` widths, set by cut points in ``[0, K - 1]``.

    The cuts are clamped to ``[0, K - 1]`` and sorted; the steps are the gaps:
    K=12, cuts (3, 6, 9) -> [3, 3, 3, 3]; cuts (0, 0, 4) -> [0, 0, 4, 8]. Any
    cuts give a valid schedule of exactly K steps with at least one at the last
    (largest) width, so a search sampling them independently never proposes an
    invalid one (the schedule search, ``conf/sweep/schedule_search.yaml``).
    """
    total = int(total_steps)
    if total < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    points = [0, *sorted(min(max(int(c), 0), total - 1) for c in cuts), total]
    return [b - a for a, b in zip(points[:-1], points[1:], strict=True)]


# The orders the schedule search tries (``schedule.order``): the widths its steps per width run in.
SCHEDULE_ORDERS: dict[str, tuple[int, ...]] = {
    "up": (8, 4, 2, 1),  # scale up: MaGNeTS' order
    "down": (1, 2, 4, 8),  # large -> small
    "sandwich": (8, 2, 1, 4),  # small -> large -> small
}


def schedule_order(order: str) -> list[int]:
    """The widths of a search ``order`` (one of :data:`SCHEDULE_ORDERS`)."""
    if order not in SCHEDULE_ORDERS:
        raise ValueError(f"unknown schedule order {order!r}; valid: {list(SCHEDULE_ORDERS)}")
    return list(SCHEDULE_ORDERS[order])


def searched_schedule_name(total_steps: int, *cuts: int, order: str = "up") -> str:
    """``search_<k_8>-<k_4>-<k_2>-<k_1>`` (scale up) or ``search_<order>_<steps per width>``: a searched schedule's name."""
    steps = "-".join(map(str, steps_from_cuts(total_steps, *cuts)))
    return f"search_{steps}" if order == "up" else f"search_{order}_{steps}"


# conf/schedule/search.yaml computes its steps and name from its cut points with these.
OmegaConf.register_new_resolver(
    "magnets_steps_from_cuts", lambda total_steps, *cuts: OmegaConf.create(steps_from_cuts(total_steps, *cuts)), replace=True
)  # a ListConfig: a config resolved in place holds no plain lists
OmegaConf.register_new_resolver(
    "magnets_searched_schedule_name",
    lambda order, total_steps, *cuts: searched_schedule_name(total_steps, *cuts, order=order),
    replace=True,
)
OmegaConf.register_new_resolver("magnets_schedule_order", lambda order: OmegaConf.create(schedule_order(order)), replace=True)


def load_schedule(schedule: str | Mapping[str, Any]) -> ModelSchedule:
    """A schedule from its ``conf/schedule/`` name, or from a mapping with ``name``, ``widths``, ``steps``."""
    if isinstance(schedule, str):
        path = SCHEDULE_DIR / f"{schedule}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown schedule {schedule!r}; shipped: {shipped_schedules()}")
        schedule = cast(Mapping[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    missing = {"name", "widths", "steps"} - set(schedule)
    if missing:
        raise ValueError(f"a schedule needs name, widths and steps; {dict(schedule)} lacks {sorted(missing)}")
    return ModelSchedule(str(schedule["name"]), tuple(schedule["widths"]), tuple(schedule["steps"]))
