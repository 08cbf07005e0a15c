"""The parallel decode loop over a tokens-to-logits callable.

:func:`decode` runs one width per step (a schedule's ``width_per_step``) and
is a pure function of its inputs and a ``torch.Generator``: it knows nothing
of trainers or caches. The callable (``magnets.decoding.cache.build_tokens_to_logits``
or the planned fast path of ``magnets.decoding.fast``) decides how each
step's logits are computed and reports the work it did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from magnets import choices
from magnets.choices import GUIDANCE_RAMPS
from magnets.decoding.cache import ascending_positions
from magnets.decoding.plan import StepWork
from magnets.masking import MASK_SCHEDULES, decode_masked_counts

# tokens [B, N], labels [B], width, step -> (logits [B, M, V] at the masked positions in ascending order, work): the
# work of a pass at one width is one StepWork; a pass of token groups (magnets.decoding.policies) reports a list.
TokensToLogits = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, StepWork | list[StepWork]]]


# Weight dtypes a model may decode in (``dtype=`` of sample, evaluate and bench); bfloat16 is the GPU setting.
DECODE_DTYPES = {name: getattr(torch, name) for name in choices.DECODE_DTYPES}


@dataclass(frozen=True)
class SamplingSettings:
    """How each step turns logits into revealed tokens: sampling temperature, Gumbel choice noise, guidance."""

    mask_schedule: str = "cosine"
    temperature: float = 0.5  # sampling temperature at the last step ...
    temperature_anneal: float = 0.8  # ... plus this much times (1 - (k+1)/K)
    choice_temperature: float = 4.5  # Gumbel noise on the confidences, times (1 - (k+1)/K)
    guidance_scale: float = 0.0  # w: (1 + w) cond - w uncond; 0 runs no unconditional branch
    guidance_ramp: str = "constant"  # constant: w at every step; linear: w (k+1)/K
    guidance_width: int = 0  # the unconditional pass at this width factor when narrower than the step's; 0: the step's
    guidance_steps: int = 0  # guidance over the last this many steps only; 0: every step

    def __post_init__(self) -> None:
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"unknown mask schedule {self.mask_schedule!r}; valid: {sorted(MASK_SCHEDULES)}")
        if self.guidance_ramp not in GUIDANCE_RAMPS:
            raise ValueError(f"unknown guidance_ramp {self.guidance_ramp!r}; valid: {list(GUIDANCE_RAMPS)}")
        if self.temperature <= 0 or self.temperature_anneal < 0:
            raise ValueError(
                f"need temperature > 0 and temperature_anneal >= 0, got {self.temperature}, {self.temperature_anneal}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_width < 0 or self.guidance_steps < 0:
            raise ValueError(
                f"guidance_width and guidance_steps must be >= 0 (0: off), got {self.guidance_width}, {self.guidance_steps}"
            )

    @classmethod
    def from_config(cls, decode_cfg: Mapping[str, Any]) -> SamplingSettings:
        """The sampling fields of a ``decode`` config group (which also holds the cache mode)."""
        return cls(**{name: decode_cfg[name] for name in cls.__dataclass_fields__})

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 0

    @property
    def separate_unconditional(self) -> bool:
        """Whether the unconditional branch runs as its own pass (its own width or steps) rather than batched with
        the conditional rows."""
        return self.guided and (self.guidance_width > 0 or self.guidance_steps > 0)

    def guided_at(self, step: int, steps: int) -> bool:
        return self.guided and (self.guidance_steps == 0 or step >= steps - self.guidance_steps)

    def unconditional_width(self, width: int) -> int:
        """The unconditional pass's width factor at a step of ``width``: the narrower of the two."""
        return max(width, self.guidance_width)

    def sampling_temperature(self, step: int, steps: int) -> float:
        return self.temperature + self.temperature_anneal * (1 - (step + 1) / steps)

    def guidance(self, step: int, steps: int) -> float:
        if self.guidance_ramp == "linear":
            return self.guidance_scale * (step + 1) / steps
        return self.guidance_scale


@dataclass
class DecodeResult:
    """Final tokens ``[B, N]``; per step its width and work; with ``keep_history``, tokens after each step ``[K, B, N]``."""

    tokens: torch.Tensor
    widths: list[int]
    work: list[StepWork]  # every pass's records, in order (a step may report several: token groups, guidance apart)
    history: torch.Tensor | None = None
    revealed: list[int] = field(default_factory=list)  # tokens revealed per step, per sample


def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log U)``, U uniform on (0, 1)."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


def decode(
    tokens_to_logits: TokensToLogits,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    width_per_step: Sequence[int],
    settings: SamplingSettings,
    *,
    mask_id: int,
    null_class: int,
    generator: torch.Generator | None = None,
    keep_history: bool = False,
    unconditional_logits: TokensToLogits | None = None,
    revealable: Callable[[], torch.Tensor | None] | None = None,
) -> DecodeResult:
    """Reveal every ``mask_id`` entry of ``tokens`` ``[B, N]`` over ``len(width_per_step)`` steps.

    Step k runs width ``width_per_step[k]``, samples every masked token from
    softmax(logits / T_k), scores it by its log-probability plus Gumbel noise
    scaled by ``choice_temperature (1 - (k+1)/K)`` and reveals the most
    confident, leaving ``decode_masked_counts`` masked. Tokens that are not
    ``mask_id`` (frame prediction, editing) stay as given. With guidance, the
    conditional and the unconditional (null class) rows run in one batch of
    2B; with ``guidance_width`` or ``guidance_steps`` set, the unconditional
    rows run through ``unconditional_logits`` (a callable of its own, with its
    own cache; its steps are numbered from its first call) at their width and
    steps. ``revealable``, called after each step's logits, may return a bool
    ``[rows, M]`` mask of the masked positions the step may reveal (a routed
    decode revealing only its wide tokens); None lets it reveal any.
    ``generator`` makes the result reproducible.
    """
    steps = len(width_per_step)
    tokens = tokens.clone()
    batch = tokens.shape[0]
    masked_per_row = (tokens == mask_id).sum(dim=1)
    if bool((masked_per_row != masked_per_row[0]).any()):
        raise ValueError(f"every row must start with the same number of masked tokens, got {masked_per_row.tolist()}")
    separate = settings.separate_unconditional
    if separate and unconditional_logits is None:
        raise ValueError("guidance_width or guidance_steps runs the unconditional branch apart: pass unconditional_logits")
    masked_after = decode_masked_counts(int(masked_per_row[0]), steps, settings.mask_schedule)
    null_labels = torch.full_like(labels, null_class)
    if settings.guided and not separate:
        labels = torch.cat([labels, null_labels])  # [2B]: conditional rows, then unconditional
    widths, work, history, revealed = [], [], [], []
    unconditional_step = 0
    masked_now = int(masked_per_row[0])
    for step, width in enumerate(width_per_step):
        rows = torch.cat([tokens, tokens]) if settings.guided and not separate else tokens  # [B or 2B, N]
        logits, step_work = tokens_to_logits(rows, labels, width, step)  # [rows, M, V]
        logits = logits.float()
        work.extend(step_work if isinstance(step_work, list) else [step_work])
        if settings.guided and not separate:
            conditional, unconditional = logits.chunk(2)  # 2 x [B, M, V]
            w = settings.guidance(step, steps)
            logits = (1 + w) * conditional - w * unconditional
        elif separate and settings.guided_at(step, steps):
            assert unconditional_logits is not None
            unconditional, unconditional_work = unconditional_logits(
                tokens, null_labels, settings.unconditional_width(width), unconditional_step
            )  # [B, M, V]
            unconditional_step += 1
            work.extend(unconditional_work if isinstance(unconditional_work, list) else [unconditional_work])
            w = settings.guidance(step, steps)
            logits = (1 + w) * logits - w * unconditional.float()
        log_probs = torch.log_softmax(logits / settings.sampling_temperature(step, steps), dim=-1)  # [B, M, V]
        sampled = (log_probs + gumbel_noise(log_probs.shape, generator, log_probs.device)).argmax(dim=-1)  # [B, M]
        reveal = masked_now - masked_after[step]
        masked_positions = ascending_positions(tokens == mask_id, masked_now)  # [B, M]
        if reveal == masked_now:  # last step: everything left
            chosen = torch.arange(masked_now, device=tokens.device).expand(batch, -1)
        else:
            sampled_log_prob = log_probs.gather(-1, sampled[..., None])[..., 0]  # [B, M]
            noise_scale = settings.choice_temperature * (1 - (step + 1) / steps)
            confidence = sampled_log_prob + noise_scale * gumbel_noise(sampled_log_prob.shape, generator, tokens.device)
            allowed = revealable() if revealable is not None else None  # [rows, M]: the conditional rows first
            if allowed is not None:
                confidence = confidence.masked_fill(~allowed[:batch], -math.inf)
            chosen = confidence.topk(reveal, dim=1).indices  # [B, reveal]: indices into the masked positions
        tokens.scatter_(1, masked_positions.gather(1, chosen), sampled.gather(1, chosen))
        masked_now = masked_after[step]
        widths.append(width)
        revealed.append(reveal)
        if keep_history:
            history.append(tokens.clone())
    return DecodeResult(tokens, widths, work, torch.stack(history) if keep_history else None, revealed)
