"""``lora-one``: LoRA initialised from one full-gradient SVD at step 0 (Zhang et al. 2025).

Algorithm 2 lines 5-7 run once; ``W0`` is not modified. Following LoRA-One's own code
(``run_exp.py``, mid-2025), not its README formula: with ``-G ~ U diag(S) V^T`` (top r),
``lora_B = U diag(sqrt S) / sqrt(gamma sigma_1)``, ``lora_A = diag(sqrt S) V^T / sqrt(gamma
sigma_1)``, so training starts from ``Delta W_0 = (scale / (gamma sigma_1)) [-G]_r``.
The gradient is averaged over ``fullgrad.batches`` training micro-batches (the code's
``bsz * iters`` examples); its SVD is randomised (``fullgrad`` section).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pesocli.methods.base import MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora import LoRA


@dataclass(kw_only=True)
class LoRAOneConfig(MethodConfig):
    gamma: float = 128.0
    """LoRA-One's "stable" scale ``gamma`` (its code's default since mid-2025)."""

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.gamma <= 0:
            errors.append(f"method.gamma must be > 0 (got {self.gamma})")
        return errors


def lora_one_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-One's ``(lora_B (out, r), lora_A (r, in))`` from the top-r SVD of ``-G = U S V^T``."""
    root = s.clamp_min(0).sqrt()
    norm = (gamma * float(s[0])) ** 0.5 if float(s[0]) > 0 else 1.0
    return u * root / norm, (root[:, None] * v.T) / norm


def negated_top_r(estimate, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of ``-G``: ``(U (out, r), S (r,), V (in, r))`` with ``-G ~ U diag(S) V^T``."""
    u, s, v = estimate.top_r(rank)
    return -u, s, v


class LoRAOne(LoRA):
    """LoRA (same delta, same export) with a full-gradient initialisation at step 0."""

    name = "lora-one"
    Config = LoRAOneConfig
    needs_full_gradient = True

    def restart_due(self, step: int) -> bool:
        return step == 0

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = []
        for name, layer in ctx.layers.items():
            start = time.perf_counter()
            estimate = ctx.gradients[name]
            u, s, v = negated_top_r(estimate, self.config.rank)
            lora_b, lora_a = lora_one_factors(u, s, v, self.config.gamma)
            with torch.no_grad():
                layer.delta.lora_B.copy_(lora_b)
                layer.delta.lora_A.copy_(lora_a)
            for param in layer.delta.parameters():
                ctx.optimizer.reset_state(param)
            records.append(
                RestartRecord(
                    step=ctx.step,
                    layer=name,
                    method=self.name,
                    kind="init",
                    rank=self.config.rank,
                    top_singular_values=s.tolist(),
                    captured_energy=estimate.captured_energy(self.config.rank),
                    anchor_rank=layer.anchor.rank,
                    seconds=time.perf_counter() - start,
                )
            )
        return records
