"""Appendix A of the PESO paper: ``min_W ||W - M||_F^2``, ``M = a diag(1 x (r+1), 0, ...)``.

The problem runs through the real machinery (adapted layer, method, full-gradient sketch,
:class:`~pesocli.optim.PesoAdamW`): one ``n x n`` linear layer with ``W0 = 0`` fed the identity,
so ``forward(I) = W^T`` and the loss is ``||W - M||_F^2``; its full gradient is ``2 (W - M)``.
Rank-r LoRA can reach at best ``a^2`` (the ``(r+1)``-th diagonal entry is out of reach).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from pesocli.engine import Engine
from pesocli.fullgrad import FullGradConfig
from pesocli.methods import method_class
from pesocli.optim import PesoAdamW


@dataclass(kw_only=True)
class SyntheticProblem:
    n: int = 64
    """Matrix size (``m = n``)."""
    rank: int = 4
    """Adapter rank ``r``; ``M`` has ``r + 1`` non-zero diagonal entries."""
    a: float = 10.0
    """Magnitude of ``M``'s diagonal; LoRA stalls at loss ``a^2``."""
    steps: int = 1500
    lr: float = 0.05
    """Peak AdamW learning rate (cosine decay to 1% of it, no warm-up)."""
    restart_every: int = 10
    """Restart period ``K`` for restart methods (10 suits the default ``continuous`` anchor update)."""
    seed: int = 0


class _OneLayer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def target_matrix(problem: SyntheticProblem) -> torch.Tensor:
    """``M = a diag(1, ..., 1, 0, ..., 0)`` with ``r + 1`` ones, ``(n, n)``."""
    diag = torch.zeros(problem.n)
    diag[: problem.rank + 1] = problem.a
    return torch.diag(diag)


def run(method_name: str, problem: SyntheticProblem, **method_options) -> list[float]:
    """Train ``method_name`` on the problem; returns the loss before each step and the final loss."""
    torch.manual_seed(problem.seed)
    cls = method_class(method_name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    options = {"rank": problem.rank, "alpha": float(problem.rank), "target_modules": ("proj",)}
    if "restart_every" in fields:
        options["restart_every"] = problem.restart_every
    if "gamma" in fields:
        options["gamma"] = 1.0
    options.update(method_options)
    method = cls(cls.Config(**options))
    method.setup(total_steps=problem.steps, steps_per_epoch=problem.steps)
    model = _OneLayer(problem.n)
    engine = Engine(model, method, FullGradConfig(oversample=4, power_iters=2))
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=problem.lr, weight_decay=0.0)
    target = target_matrix(problem).T
    eye = torch.eye(problem.n)

    def loss_fn() -> torch.Tensor:
        return (model(eye) - target).pow(2).sum()

    def run_pass() -> None:
        loss_fn().backward()

    def gradient_pass() -> float:
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    losses = []
    for step in range(problem.steps):
        lr = problem.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / problem.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        engine.maybe_restart(step, optimizer, run_pass)
        # the trainer's step: step probes (LoRSum's products with G), the method's hooks, a second pass
        # for a method that splits the step (peso-t); no clipping here
        losses.append(engine.step(optimizer, step, gradient_pass))
    with torch.no_grad():
        losses.append(float(loss_fn()))
    return losses
