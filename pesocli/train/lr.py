"""Learning-rate schedule: linear warm-up, then cosine / linear decay to 0, or constant.

Times a method's factor (:meth:`~pesocli.methods.base.Method.lr_multiplier`): 1 except for methods that
shape the schedule around their restarts (``relora``'s re-warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float,
    kind: str,
    multiplier: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; warm-up lasts ``ceil(warmup_ratio * total_steps)`` steps.

    ``multiplier(step)`` scales the factor on top (a method's
    :meth:`~pesocli.methods.base.Method.lr_multiplier`, e.g. ReLoRA's re-warm-up after each restart).
    It must be a pure function of the step: the scheduler's checkpoint holds only the step count.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    extra = multiplier or _one

    def factor(step: int) -> float:  # a plain function, so LambdaLR's state_dict saves no callable's __dict__
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup, kind=kind) * extra(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _one(step: int) -> float:
    del step
    return 1.0
