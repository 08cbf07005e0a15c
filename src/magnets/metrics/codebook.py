"""Codebook usage and perplexity of a VQ tokenizer over a whole split."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Counts how often each code is chosen; summed across processes.

    ``compute`` returns ``(usage, perplexity)``: the fraction of codes chosen
    at least once, and ``exp`` of the entropy of the code distribution (equal
    to ``codebook_size`` when every code is chosen equally often).
    """

    full_state_update = False
    counts: torch.Tensor

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.flatten(), minlength=self.codebook_size).to(self.counts)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        usage = (self.counts > 0).double().mean()
        probs = self.counts / self.counts.sum().clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        return usage, entropy.exp()
