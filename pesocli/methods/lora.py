"""``lora``: plain LoRA (Hu et al. 2021), numerically PEFT's ``LoraLayer`` (default init).

``Delta W = scale * lora_B @ lora_A``; ``lora_A (r, in)`` Kaiming-uniform (``a = sqrt(5)``),
``lora_B (out, r)`` zeros, ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The
subspace is warm-started by AdamW on both factors every step (Table 1 of the PESO paper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pesocli.methods.base import Method, MethodConfig


class LoRADelta(nn.Module):
    """``x (..., in) -> scale * dropout(x) @ lora_A^T @ lora_B^T (..., out)`` in FP32.

    ``lora_A (r, in)`` is the paper's ``B``; ``lora_B (out, r)`` is the paper's ``A``.
    """

    def __init__(
        self, out_features: int, in_features: int, rank: int, scale: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's init: ``lora_A`` Kaiming-uniform (``a = sqrt(5)``), ``lora_B`` zero, so ``Delta W = 0``.

        In place (the parameters keep their identity); ``lora_A`` draws from the global torch RNG.
        """
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale goes on the (..., r) intermediate, not on the (..., out) output as PEFT does: the
        # same product and the same saved tensors, a far smaller elementwise pass each way.
        x = self.dropout(x.to(self.lora_A.dtype))
        lora_a, lora_b = self._factors()
        hidden = nn.functional.linear(x, lora_a)
        if self.scale != 1.0:
            hidden = hidden * self.scale
        return nn.functional.linear(hidden, lora_b)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A (r, in), lora_B (out, r))`` as the forward uses them (subclasses may detach one)."""
        return self.lora_A, self.lora_B

    def low_rank_pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(down (r, in), up (out, r))`` with ``up @ down = Delta W``, as autograd sees them, for
        :class:`~pesocli.layers.AdaptedLinear`'s forward fused with the anchor; ``None`` while
        dropout is active (the fused chain would apply it to the anchor too)."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        lora_a, lora_b = self._factors()
        return lora_a, (lora_b * self.scale if self.scale != 1.0 else lora_b)

    def weight(self) -> torch.Tensor:
        """Dense ``Delta W (out, in)`` (tests and export only)."""
        return self.scale * self.lora_B @ self.lora_A

    @torch.no_grad()
    def set_product(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Set the factors so that ``scale * lora_B @ lora_A = up (out, r) @ down (r, in)``."""
        root = math.sqrt(self.scale)
        self.lora_B.copy_(up / root)
        self.lora_A.copy_(down / root)

    def paper_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's ``(A (out, r), B (r, in))`` with ``A B = Delta W``."""
        root = math.sqrt(self.scale)
        return self.lora_B.detach() * root, self.lora_A.detach() * root


class LoRA(Method):
    """LoRA baseline: no restarts, no anchor."""

    name = "lora"
    Config = MethodConfig

    def build_delta(self, out_features: int, in_features: int) -> LoRADelta:
        c = self.config
        return LoRADelta(out_features, in_features, c.rank, c.scale, c.dropout)

    def lora_factors(self, delta: LoRADelta):
        return delta.lora_A.detach(), delta.lora_B.detach(), delta.scale
