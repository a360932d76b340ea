"""``peso-t``: PESO-LoRA-T, SVD-subspace exploitation (Algorithm 6).

``Delta W = U diag(xi) V`` with ``U (out, r)``, ``xi (r,)``, ``V (r, in)``; AdamW steps ``xi``
every step and ``(U, V)`` every ``K = subspace_every`` steps (default 1). Algorithm 6 returns
``W0 + U diag(xi) V``: there is no anchor.

``update_order``, with ``k = step + 1`` the paper's 1-based step:
- ``sequential`` (default; Algorithm 6 as written). When ``k mod K = 0``, ``(U, V)`` step first, on
  their gradients at ``(U_{k-1}, xi_{k-1}, V_{k-1})`` (lines 5-13); a second forward + backward over
  the same micro-batches then gives ``xi``'s gradient at the updated ``(U_k, V_k)`` (line 15) and
  ``xi`` steps (lines 16-18). On other steps ``xi`` alone steps, from one pass. Bias correction uses
  the global ``k`` for all three (``1 - beta^k``, lines 10-11 and 17), not each tensor's own update
  count. Cost: one more forward + backward every ``K`` steps, so about twice a LoRA step at ``K = 1``.
- ``simultaneous`` (peso's order before this option existed; cheaper, not Algorithm 6). One pass per
  step: ``(U, V)`` and ``xi`` step together on the gradients at ``(U_{k-1}, xi_{k-1}, V_{k-1})``;
  ``(U, V)`` on the 0-based steps with ``step mod K = 0`` (steps 0, K, 2K, ...); each tensor's bias
  correction counts its own updates. Against an FP64 Algorithm 6 (``tests/test_peso_t.py``, a
  least-squares toy, 9 steps) its ``U diag(xi) V`` is 0.5% off at ``K = 1`` and 21% at ``K = 3``.

Initialisation (the paper leaves ``U_0, V_0, xi_0`` open), ``init``:
- ``gradient`` (default): ``U, V`` = top-r singular vectors of ``-G`` at step 0 (the same
  full-gradient estimate as ``peso-r``), ``xi = 0``. The model starts at ``W0`` and the first
  ``xi`` gradient is ``-Sigma``: the first steps descend along the top gradient directions.
- ``weights``: ``U, V`` = top-r singular vectors of ``W0`` (PiSSA's subspace, ``W0`` untouched),
  ``xi = 0``.
Before the step-0 initialisation ``U, V`` are random orthonormal and ``xi = 0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from pesocli.layers import base_weight
from pesocli.methods.base import Method, MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora_one import negated_top_r


@dataclass(kw_only=True)
class PesoTConfig(MethodConfig):
    subspace_every: int = 1
    """``K``: AdamW updates ``(U, V)`` every ``K`` steps (``xi`` every step)."""
    init: str = "gradient"
    """``gradient`` (top-r SVD of ``-G`` at step 0) or ``weights`` (top-r SVD of ``W0``)."""
    update_order: str = "sequential"
    """``sequential`` (Algorithm 6: ``(U, V)`` first, then ``xi``'s gradient at the new ``(U, V)`` from a
    second pass; global-step bias correction) or ``simultaneous`` (one pass, all together; cheaper)."""

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.subspace_every < 1:
            errors.append(f"method.subspace_every (K) must be >= 1 (got {self.subspace_every})")
        if self.init not in ("gradient", "weights"):
            errors.append(f"method.init must be gradient or weights (got {self.init!r})")
        if self.update_order not in ("sequential", "simultaneous"):
            errors.append(
                f"method.update_order must be sequential or simultaneous (got {self.update_order!r})"
            )
        return errors


class SVDDelta(nn.Module):
    """``x (..., in) -> ((x @ V^T) * xi) @ U^T (..., out)``: ``Delta W = U diag(xi) V`` (FP32)."""

    def __init__(self, out_features: int, in_features: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.linalg.qr(torch.randn(out_features, rank))[0])
        self.V = nn.Parameter(torch.linalg.qr(torch.randn(in_features, rank))[0].T.contiguous())
        self.xi = nn.Parameter(torch.zeros(rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.xi.dtype))
        return nn.functional.linear(nn.functional.linear(x, self.V) * self.xi, self.U)

    def weight(self) -> torch.Tensor:
        """Dense ``Delta W (out, in)`` (tests and export only)."""
        return (self.U * self.xi) @ self.V


class PesoT(Method):
    name = "peso-t"
    Config = PesoTConfig

    @property
    def needs_full_gradient(self) -> bool:  # type: ignore[override]
        return self.config.init == "gradient"

    def build_delta(self, out_features: int, in_features: int) -> SVDDelta:
        return SVDDelta(out_features, in_features, self.config.rank, self.config.dropout)

    def restart_due(self, step: int) -> bool:
        return step == 0

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = []
        for name, layer in ctx.layers.items():
            start = time.perf_counter()
            delta: SVDDelta = layer.delta
            if self.config.init == "gradient":
                estimate = ctx.gradients[name]
                u, s, v = negated_top_r(estimate, self.config.rank)
                energy = estimate.captured_energy(self.config.rank)
            else:
                full_u, s, full_vh = torch.linalg.svd(base_weight(layer.base), full_matrices=False)
                u, s, v = full_u[:, : self.config.rank], s[: self.config.rank], full_vh[: self.config.rank].T
                energy = None
            with torch.no_grad():
                delta.U.copy_(u)
                delta.V.copy_(v.T)
                delta.xi.zero_()
            for param in delta.parameters():
                ctx.optimizer.reset_state(param)
            records.append(
                RestartRecord(
                    step=ctx.step,
                    layer=name,
                    method=self.name,
                    kind="init",
                    rank=self.config.rank,
                    top_singular_values=s.tolist(),
                    captured_energy=energy,
                    anchor_rank=layer.anchor.rank,
                    seconds=time.perf_counter() - start,
                    extra={"init": self.config.init},
                )
            )
        return records

    @property
    def sequential(self) -> bool:
        return self.config.update_order == "sequential"

    def subspace_moves(self, step: int) -> bool:
        """Whether ``(U, V)`` step at optimizer step ``step`` (0-based); see ``update_order``."""
        k = step + 1 if self.sequential else step  # sequential: the paper's k mod K = 0, k = step + 1
        return k % self.config.subspace_every == 0

    def first_phase(self, layers, step: int) -> list[nn.Parameter] | None:
        """Sequential order on a subspace step: ``(U, V)`` first; ``xi`` steps on a second pass (line 15)."""
        if not (self.sequential and self.subspace_moves(step)):
            return None
        return [p for layer in layers.values() for p in (layer.delta.U, layer.delta.V)]

    def before_step(self, layers, optimizer, step: int) -> None:
        moves = self.subspace_moves(step)
        for layer in layers.values():
            delta: SVDDelta = layer.delta
            if not moves:  # Algorithm 6 line 5: (U, V) move only every K steps
                delta.U.grad = None
                delta.V.grad = None
            if self.sequential:  # lines 10-11, 17: bias correction 1 - beta^k with the global k = step + 1
                for param in (delta.U, delta.V, delta.xi):
                    if param.grad is not None:
                        optimizer.set_step_count(param, step)

    def lora_factors(self, delta: SVDDelta):
        """``lora_A = V (r, in)``, ``lora_B = U diag(xi) (out, r)``, scale 1 (exact)."""
        return delta.V.detach(), (delta.U * delta.xi).detach(), 1.0
