"""The adapted linear layer: ``forward(x) = base(x) + anchor(x) + delta(x)``.

Orientation (the single convention inside peso): every weight-shaped matrix is ``(out, in)``
as in ``nn.Linear`` (``y = x W^T``), so the paper's ``W in R^{m x n}`` has ``m = out``,
``n = in``. Low-rank pairs are stored PEFT-style: ``up (out, r)`` and ``down (r, in)`` with
``Delta W = up @ down``; for LoRA ``up = lora_B`` (= paper ``A``) and ``down = lora_A``
(= paper ``B``), ``Delta W = scale * lora_B @ lora_A``. The full gradient of a layer is
``G = dL/dW (out, in) = sum_tokens grad_out^T x``.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch
from torch import nn

from pesocli.errors import ConfigError
from pesocli.linalg import low_rank_svd


class GradientProbe(Protocol):
    """Receives a layer's input and output gradient during backward (see ``pesocli.fullgrad``)."""

    def observe(self, x: torch.Tensor, grad_out: torch.Tensor) -> None: ...


class LowRankAnchor(nn.Module):
    """The absorbed history ``W~ - W0`` of one layer (Algorithm 2 line 4), FP32 by default.

    ``lowrank`` mode keeps a stacked pair ``up (out, R)``, ``down (R, in)``: absorbing appends
    columns/rows (exact) and :meth:`compress` re-factors exactly by QR + small SVD. ``dense``
    mode keeps ``weight (out, in)``.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        mode: str = "lowrank",
        rank_cap: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("lowrank", "dense"):
            raise ValueError(f"anchor mode must be lowrank or dense, got {mode!r}")
        self.mode = mode
        self.rank_cap = rank_cap
        self.out_features, self.in_features = out_features, in_features
        dense_shape = (out_features, in_features) if mode == "dense" else (0, 0)
        self.register_buffer("up", torch.zeros(out_features, 0, dtype=dtype, device=device))
        self.register_buffer("down", torch.zeros(0, in_features, dtype=dtype, device=device))
        self.register_buffer("weight", torch.zeros(dense_shape, dtype=dtype, device=device))
        self.is_zero = True

    @property
    def rank(self) -> int:
        """Number of stacked components (``R``); for a dense anchor, ``min(out, in)`` once non-zero."""
        if self.mode == "dense":
            return 0 if self.is_zero else min(self.out_features, self.in_features)
        return self.up.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` in the anchor's dtype (the caller casts back)."""
        x = x.to(self.up.dtype)
        if self.mode == "dense":
            return nn.functional.linear(x, self.weight)
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up)

    @torch.no_grad()
    def absorb(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """``W~ - W0 += up (out, k) @ down (k, in)``; re-compresses when the rank passes the cap."""
        up = up.to(self.up.dtype)
        down = down.to(self.down.dtype)
        self.is_zero = False
        if self.mode == "dense":
            self.weight.add_(up @ down)
            return
        self.up = torch.cat([self.up, up], dim=1)
        self.down = torch.cat([self.down, down], dim=0)
        if self.rank > self.rank_cap:
            self.compress()

    @torch.no_grad()
    def compress(self, max_rank: int | None = None, rtol: float = 1e-6) -> float:
        """Re-factor the pair to its numerical rank (exact up to ``rtol * sigma_1``).

        With ``max_rank`` the pair is truncated further (lossy); returns the relative energy
        dropped, ``sum(dropped sigma^2) / sum(sigma^2)`` (0.0 when exact).
        """
        if self.mode == "dense" or self.rank == 0:
            return 0.0
        u, s, vh = low_rank_svd(self.up.float(), self.down.float())
        keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        total = float(s.pow(2).sum())
        dropped_from = keep if max_rank is None else min(keep, max_rank)
        dropped = float(s[dropped_from:].pow(2).sum()) if total > 0 else 0.0
        root = s[:dropped_from].sqrt()
        self.up = (u[:, :dropped_from] * root).to(self.up.dtype)
        self.down = (root[:, None] * vh[:dropped_from]).to(self.down.dtype)
        return dropped / total if (max_rank is not None and total > 0) else 0.0

    def materialize(self) -> torch.Tensor:
        """The dense ``W~ - W0 (out, in)`` (export and tests only)."""
        if self.mode == "dense":
            return self.weight.clone()
        return self.up @ self.down

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The stacked rank changes during training: take the checkpoint's shapes.
        for name in ("up", "down", "weight"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        self.is_zero = not any(
            (
                state_dict.get(prefix + n) is not None
                and state_dict[prefix + n].numel()
                and bool(state_dict[prefix + n].abs().sum() > 0)
            )
            for n in ("up", "weight")
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _ProbedSum(torch.autograd.Function):
    """``y + delta`` whose backward hands ``(x, grad_out)`` to a :class:`GradientProbe`.

    ``x`` is kept with ``save_for_backward``, so it goes through autograd's saved-tensor hooks:
    under non-reentrant gradient checkpointing it is dropped after the forward and recomputed for
    the backward, and the probe fires once per layer and pass, in the one backward of the original
    graph, with the recomputed input (the recomputed graph is never backpropagated). Under
    reentrant checkpointing the first forward runs without grad, so only the recomputation
    attaches the probe. (A tensor hook closing over ``x`` would give the same numbers but keep
    every adapted layer's input alive, which defeats checkpointing.)
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, probe: GradientProbe):  # noqa: ANN205
        ctx.save_for_backward(x)
        ctx.probe = probe
        return y + delta

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        (x,) = ctx.saved_tensors
        ctx.probe.observe(x.detach(), grad_out)
        need_y, need_delta = ctx.needs_input_grad[:2]
        return (grad_out if need_y else None), (grad_out if need_delta else None), None, None


class _AnchoredPair(torch.autograd.Function):
    """``x @ [anchor_down; down]^T @ [anchor_up, up]^T``: a frozen anchor and a trained pair in one chain.

    Shapes: ``x (..., in)``, ``anchor_down (R, in)``, ``anchor_up (out, R)``, ``down (r, in)``,
    ``up (out, r)``; returns ``(..., out)``. Saves what LoRA alone saves (``x`` and the pair's
    ``x @ down^T``, ``(..., r)``), not the stacked ``(..., R + r)`` intermediate autograd would keep;
    the anchor gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, anchor_down, anchor_up, down, up):  # noqa: ANN001, ANN205
        rank = anchor_down.shape[0]
        hidden = nn.functional.linear(x, torch.cat([anchor_down, down], dim=0))  # (..., R + r)
        out = nn.functional.linear(hidden, torch.cat([anchor_up, up], dim=1))
        ctx.save_for_backward(x, hidden[..., rank:].contiguous(), anchor_down, anchor_up, down, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, pair_hidden, anchor_down, anchor_up, down, up = ctx.saved_tensors
        need_x, _, _, need_down, need_up = ctx.needs_input_grad
        rank = anchor_down.shape[0]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_down = grad_up = None
        if need_up:
            grad_up = g2.T @ pair_hidden.reshape(-1, pair_hidden.shape[-1])  # (out, r)
        if need_x:
            back = g2 @ torch.cat([anchor_up, up], dim=1)  # (T, R + r)
            grad_x = (back @ torch.cat([anchor_down, down], dim=0)).reshape(x.shape)
            back_pair = back[:, rank:]
        elif need_down:
            back_pair = g2 @ up
        if need_down:
            grad_down = back_pair.T @ x.reshape(-1, x.shape[-1])  # (r, in)
        return grad_x, None, None, grad_down, grad_up


class AdaptedLinear(nn.Module):
    """A frozen ``base`` linear layer plus an ``anchor`` and the method's trainable ``delta``.

    ``base`` is ``nn.Linear`` (FP32/BF16) or a bitsandbytes ``Linear4bit``/``Linear8bitLt``; it
    is never written during training. ``delta`` maps ``x (..., in)`` to ``(..., out)``.
    ``forward(x) = base(x) + anchor(x) + delta(x)``; ``W~ = W0 + anchor`` is never materialised.
    While a :class:`GradientProbe` is attached, backward hands it ``(x, grad_out)`` so it can form
    products with the full gradient ``G = grad_out^T x`` of the effective weight.
    """

    def __init__(self, base: nn.Module, delta: nn.Module, anchor: LowRankAnchor) -> None:
        super().__init__()
        self.base = base
        self.anchor = anchor
        self.delta = delta
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.probe: GradientProbe | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self._fused_low_rank(x)
        if delta is None:
            if not self.anchor.is_zero:
                y = y + self.anchor(x).to(y.dtype)
            delta = self.delta(x)
        delta = delta.to(y.dtype)
        probe = self.probe
        if probe is not None and torch.is_grad_enabled() and (y.requires_grad or delta.requires_grad):
            return _ProbedSum.apply(y, delta, x, probe)
        return y + delta

    def _fused_low_rank(self, x: torch.Tensor) -> torch.Tensor | None:
        """``anchor(x) + delta(x)`` as one low-rank chain (:class:`_AnchoredPair`), or ``None``.

        Applies with a non-zero low-rank anchor and a delta that is a plain pair
        (``delta.low_rank_pair()`` gives ``down (r, in)``, ``up (out, r)``). Two matmuls instead of
        four and one ``(..., out)`` output instead of two: the separate chains cost 20% over LoRA
        per 768 x 768 layer at an anchor rank of 16, the fused one ~6%
        (``scripts/bench_methods.py --layer-micro``).
        """
        anchor = self.anchor
        if anchor.is_zero or anchor.mode != "lowrank":
            return None
        pair_of = getattr(self.delta, "low_rank_pair", None)
        pair = pair_of() if pair_of is not None else None
        if pair is None:
            return None
        down, up = pair
        dtype = anchor.up.dtype
        return _AnchoredPair.apply(x.to(dtype), anchor.down, anchor.up, down.to(dtype), up.to(dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, anchor_rank={self.anchor.rank}"


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight ``W0 (out, in)`` in FP32 (dequantised for bitsandbytes layers).

    Materialises one layer's weight: for references, export and tests, not for training.
    """
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(weight.data, quant_state).float()
    if (
        getattr(weight, "SCB", None) is not None
        or getattr(layer, "state", None) is not None
        and getattr(layer.state, "SCB", None) is not None
    ):
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        # bitsandbytes' own order (``CB * (SCB / 127)``), so FP32 results match its forward bit for bit.
        return weight.data.float() * (scb.float() * (1.0 / 127.0))[:, None]
    return weight.detach().float()


def effective_weight(layer: AdaptedLinear, delta_weight: torch.Tensor) -> torch.Tensor:
    """Dense ``W0 + anchor + Delta W`` of one layer (tests and export only)."""
    return base_weight(layer.base) + layer.anchor.materialize().float() + delta_weight.float()


_REGEX_CHARS = re.compile(r"[.\\^$*+?{}\[\]|()]")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if _REGEX_CHARS.search(pattern):
            if re.fullmatch(pattern, name):
                return True
        elif leaf == pattern:
            return True
    return False


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a bitsandbytes linear (both subclass ``nn.Linear``)."""
    return isinstance(module, nn.Linear)


def inject_adapters(
    model: nn.Module,
    patterns: tuple[str, ...],
    make_delta,
    *,
    anchor_mode: str = "lowrank",
    anchor_rank_cap: int = 256,
) -> dict[str, AdaptedLinear]:
    """Replace every linear module whose name matches ``patterns`` by an :class:`AdaptedLinear`.

    Freezes all of ``model``'s parameters first; only the deltas are trainable. ``make_delta``
    is called as ``make_delta(out_features, in_features)``. Raises :class:`ConfigError` listing
    the linear module names when nothing matches. Returns the adapted layers by full name.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if is_linear(module)
        and not isinstance(module, AdaptedLinear)
        and _matches(name, patterns)
        and name.rsplit(".", 1)[-1] != "lm_head"
    ]
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ConfigError(
            f"target_modules {list(patterns)} match no linear layer; linear layers here: {', '.join(leaves)}"
        )
    adapted: dict[str, AdaptedLinear] = {}
    for name, base in targets:
        device = base.weight.device
        delta = make_delta(base.out_features, base.in_features).to(device)
        anchor = LowRankAnchor(
            base.out_features, base.in_features, mode=anchor_mode, rank_cap=anchor_rank_cap, device=device
        )
        layer = AdaptedLinear(base, delta, anchor)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        adapted[name] = layer
    return adapted


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """All :class:`AdaptedLinear` modules of ``model`` by full name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
