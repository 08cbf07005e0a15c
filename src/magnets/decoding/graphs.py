"""CUDA graphs for the planned decode: a step's forward captured once over static inputs, then replayed.

Every step of a planned decode (``magnets.decoding.plan``) has static shapes,
so its forward can be recorded once as a CUDA graph and replayed by every later
decode of the same plan: one launch per step instead of several hundred kernels
launched from Python. The captured steps of one plan share a memory pool, which
is safe because they always replay in the order they were captured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


class CapturedStep:
    """One step's forward captured into a CUDA graph over static inputs; calling it copies the inputs in and replays."""

    def __init__(self, forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pool: _POOL_HANDLE | None) -> None:
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        # Weights cast by autocast in the warm-up would be read by the graph after the cast cache is freed.
        torch.clear_autocast_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the pool's memory is reused by the next step's replay
