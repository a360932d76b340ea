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


ANCHOR_MODES: tuple[str, ...] = ("lowrank", "dense", "fold")
"""How an anchor holds ``W~ - W0``: a stacked low-rank pair, a dense FP32/BF16 matrix, or folded into
the base weight itself (Algorithm 2 line 4 as written; non-quantised bases only)."""

ANCHOR_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Config names of the anchor's storage dtypes (``method.anchor_dtype``)."""


class LowRankAnchor(nn.Module):
    """The absorbed history ``W~ - W0`` of one layer (Algorithm 2 line 4), FP32 by default.

    ``lowrank`` mode keeps a stacked pair ``up (out, R)``, ``down (R, in)``: absorbing appends
    columns/rows (exact) and :meth:`compress` re-factors exactly by QR + small SVD when ``R`` passes
    ``rank_cap``. Two lossy bounds (off by default) keep ``R`` from growing with the run: after every
    absorb the pair is truncated to the fewest components holding ``keep_energy`` of its energy
    (``sum sigma^2``) and to at most ``max_rank``; the fraction of energy dropped is added to
    :attr:`dropped_energy` (read and reset with :meth:`take_dropped_energy`). ``dense`` mode keeps
    ``weight (out, in)``. ``fold`` mode adds every absorbed product into the base layer's own weight
    (:meth:`fold_into`), so the anchor costs no memory and no FLOPs; the base is then no longer
    ``W0``, and the folded weight is saved instead of the pair (:meth:`state_tensors`).

    ``dtype`` is the storage dtype (FP32 or BF16); the forward computes in the wider of the input's
    and the anchor's dtype, so a BF16 anchor halves the anchor's memory without lowering the precision
    of an FP32 model's activations.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        mode: str = "lowrank",
        rank_cap: int = 256,
        max_rank: int | None = None,
        keep_energy: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {', '.join(ANCHOR_MODES)}, got {mode!r}")
        self.mode = mode
        self.rank_cap = rank_cap
        self.max_rank = max_rank
        self.keep_energy = keep_energy
        self.out_features, self.in_features = out_features, in_features
        dense_shape = (out_features, in_features) if mode == "dense" else (0, 0)
        self.register_buffer("up", torch.zeros(out_features, 0, dtype=dtype, device=device))
        self.register_buffer("down", torch.zeros(0, in_features, dtype=dtype, device=device))
        self.register_buffer("weight", torch.zeros(dense_shape, dtype=dtype, device=device))
        self.is_zero = True
        """Whether the forward adds nothing (always true for ``fold``: the base carries the anchor)."""
        self.folded = False
        """``fold`` only: whether anything has been added into the base weight."""
        self.dropped_energy = 0.0
        """Fractions of the anchor's energy dropped by lossy truncation since the last
        :meth:`take_dropped_energy` (summed over absorbs)."""
        self._fold_target: list[nn.Module] = []  # a list, so the base is not registered twice

    @property
    def lossy(self) -> bool:
        """Whether a low-rank anchor is truncated after every absorb (``keep_energy < 1`` or ``max_rank``)."""
        return self.mode == "lowrank" and (self.keep_energy < 1.0 or self.max_rank is not None)

    @property
    def rank(self) -> int:
        """Stacked components (``R``); ``min(out, in)`` for a non-zero dense anchor; 0 when folded."""
        if self.mode == "dense":
            return 0 if self.is_zero else min(self.out_features, self.in_features)
        return self.up.shape[1]

    def fold_into(self, base: nn.Module) -> None:
        """``fold`` mode: absorb into ``base.weight`` (an FP32/BF16 ``nn.Linear``; quantised or sharded
        bases raise :class:`ConfigError`)."""
        weight = getattr(base, "weight", None)
        plain = (
            isinstance(weight, torch.Tensor)
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            and getattr(weight, "quant_state", None) is None
            and getattr(weight, "SCB", None) is None
            and type(weight.data).__name__ != "DTensor"
        )
        if not plain:
            raise ConfigError(
                "method.anchor_mode fold needs a non-quantised, unsharded FP32/BF16 base "
                "(model.quant none, train.fsdp false); use lowrank"
            )
        self._fold_target = [base]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` in the wider of ``x``'s and the anchor's dtype (caller casts)."""
        dtype = torch.promote_types(x.dtype, self.up.dtype)
        x = x.to(dtype)
        if self.mode == "dense":
            return nn.functional.linear(x, self.weight.to(dtype))
        if self.mode == "fold":
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return nn.functional.linear(nn.functional.linear(x, self.down.to(dtype)), self.up.to(dtype))

    @torch.no_grad()
    def absorb(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """``W~ - W0 += up (out, k) @ down (k, in)``; re-compresses when the rank passes the cap.

        With ``keep_energy < 1`` or ``max_rank`` a low-rank anchor is then truncated (lossy); the dropped
        fraction of its energy is added to :attr:`dropped_energy`.
        """
        if self.mode == "fold":
            base = self._fold_target[0]
            # In FP32, then rounded once to the base's dtype: the only loss is that rounding.
            base.weight.copy_(base.weight.float() + up.float() @ down.float())
            self.folded = True
            return
        up = up.to(self.up.dtype)
        down = down.to(self.down.dtype)
        self.is_zero = False
        if self.mode == "dense":
            self.weight.copy_(self.weight.float() + up.float() @ down.float())
            return
        self.up = torch.cat([self.up, up], dim=1)
        self.down = torch.cat([self.down, down], dim=0)
        if self.lossy:
            self.dropped_energy += self.compress(max_rank=self.max_rank, keep_energy=self.keep_energy)
        elif self.rank > self.rank_cap:
            self.compress()

    def take_dropped_energy(self) -> float:
        """:attr:`dropped_energy` since the last call, then reset to 0."""
        dropped, self.dropped_energy = self.dropped_energy, 0.0
        return dropped

    @torch.no_grad()
    def compress(self, max_rank: int | None = None, rtol: float = 1e-6, keep_energy: float = 1.0) -> float:
        """Re-factor the pair to its numerical rank (exact up to ``rtol * sigma_1``).

        With ``max_rank`` and/or ``keep_energy < 1`` the pair is truncated further (lossy) to at most
        ``max_rank`` components and to the fewest that hold ``keep_energy`` of ``sum sigma^2``. Returns
        the relative energy dropped, ``sum(dropped sigma^2) / sum(sigma^2)`` (0.0 when exact).
        The kept pair is balanced: ``up = U_k Sigma_k^1/2``, ``down = Sigma_k^1/2 V_k^T``.
        """
        if self.mode != "lowrank" or self.rank == 0:
            return 0.0
        u, s, vh = low_rank_svd(self.up.float(), self.down.float())
        keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        energy = s.pow(2)
        total = float(energy.sum())
        lossy = max_rank is not None or keep_energy < 1.0
        if max_rank is not None:
            keep = min(keep, max_rank)
        if keep_energy < 1.0 and total > 0:
            # fewest components whose energy reaches keep_energy of the total
            enough = int((energy.cumsum(0) < keep_energy * total).sum()) + 1
            keep = min(keep, enough)
        dropped = float(energy[keep:].sum()) if total > 0 else 0.0
        root = s[:keep].sqrt()
        self.up = (u[:, :keep] * root).to(self.up.dtype)
        self.down = (root[:, None] * vh[:keep]).to(self.down.dtype)
        return dropped / total if (lossy and total > 0) else 0.0

    def materialize(self) -> torch.Tensor:
        """The dense ``W~ - W0 (out, in)``, FP32 for a low-rank pair (export and tests only).

        ``fold``: zeros, because the base weight already holds ``W~`` (so ``base + materialize()`` is
        still ``W~``); the difference to ``W0`` needs the original weights (:meth:`unfold`).
        """
        if self.mode == "dense":
            return self.weight.clone()
        if self.mode == "fold":
            return self.up.new_zeros(self.out_features, self.in_features, dtype=torch.float32)
        return self.up.float() @ self.down.float()  # FP32 even for a BF16 pair: no rounding of the product

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves, by key suffix: ``up``/``down``, ``weight`` (dense) or ``folded``
        (the base weight ``W~`` after folding; nothing while nothing is folded)."""
        if self.mode == "dense":
            return {"weight": self.weight}
        if self.mode == "fold":
            return {"folded": self._fold_target[0].weight} if self.folded else {}
        return {"up": self.up, "down": self.down}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], *, unfold: bool = False) -> None:
        """Load what :meth:`state_tensors` saved (``tensors`` by suffix; raises ``KeyError`` naming a
        missing one). ``fold`` with ``unfold``: the base keeps ``W0`` and this anchor becomes a dense
        one holding ``W~ - W0`` in FP32, so exports (which need ``W0`` apart) read it as any dense anchor."""
        if self.mode == "dense":
            self.weight.copy_(tensors["weight"])
            self.is_zero = not bool(self.weight.abs().sum() > 0)
        elif self.mode == "fold":
            if "folded" not in tensors:
                return
            base = self._fold_target[0]
            if unfold:
                diff = tensors["folded"].to(base.weight.device).float() - base.weight.float()
                self.mode = "dense"
                self.weight = diff
                self.is_zero = not bool(diff.abs().sum() > 0)
            else:
                base.weight.copy_(tensors["folded"])
                self.folded = True
        else:
            device = self.up.device
            self.up = tensors["up"].to(device, self.up.dtype)
            self.down = tensors["down"].to(device, self.down.dtype)
            self.is_zero = self.rank == 0

    @property
    def restorable(self) -> bool:
        """Whether a restart can be undone by holding :attr:`up`/:attr:`down` (``lowrank`` only:
        dense and folded anchors are written in place)."""
        return self.mode == "lowrank"

    def check_tensors(self) -> list[torch.Tensor]:
        """The tensors whose values a non-finite check must look at."""
        if self.mode == "fold":
            return [self._fold_target[0].weight] if self.folded else []
        return [self.weight] if self.mode == "dense" else [self.up, self.down]

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
    the anchor gets no gradient. The anchor may be narrower than ``x`` (a BF16 anchor on an FP32
    model): it is widened to ``x``'s dtype in forward and again in backward, never saved widened.
    """

    @staticmethod
    def forward(ctx, x, anchor_down, anchor_up, down, up):  # noqa: ANN001, ANN205
        rank = anchor_down.shape[0]
        # a narrower (BF16) anchor is widened here and again in backward: saving the widened copies
        # would keep an FP32 anchor per layer alive until the backward, more than the FP32 anchor itself
        wide_down, wide_up = anchor_down.to(x.dtype), anchor_up.to(x.dtype)
        hidden = nn.functional.linear(x, torch.cat([wide_down, down], dim=0))  # (..., R + r)
        out = nn.functional.linear(hidden, torch.cat([wide_up, up], dim=1))
        ctx.save_for_backward(x, hidden[..., rank:].contiguous(), anchor_down, anchor_up, down, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, pair_hidden, anchor_down, anchor_up, down, up = ctx.saved_tensors
        anchor_down, anchor_up = anchor_down.to(x.dtype), anchor_up.to(x.dtype)
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
        # the widest of input, anchor and adapter: a BF16 anchor does not lower an FP32 adapter's precision
        dtype = torch.promote_types(torch.promote_types(x.dtype, anchor.up.dtype), up.dtype)
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
    anchor_max_rank: int | None = None,
    anchor_keep_energy: float = 1.0,
    anchor_dtype: torch.dtype = torch.float32,
) -> dict[str, AdaptedLinear]:
    """Replace every linear module whose name matches ``patterns`` by an :class:`AdaptedLinear`.

    Freezes all of ``model``'s parameters first; only the deltas are trainable. ``make_delta``
    is called as ``make_delta(out_features, in_features)``; the ``anchor_*`` arguments go to each
    :class:`LowRankAnchor`. Raises :class:`ConfigError` listing the linear module names when nothing
    matches, or when ``anchor_mode`` is ``fold`` and a base is quantised. Returns the adapted layers
    by full name.
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
            base.out_features,
            base.in_features,
            mode=anchor_mode,
            rank_cap=anchor_rank_cap,
            max_rank=anchor_max_rank,
            keep_energy=anchor_keep_energy,
            dtype=anchor_dtype,
            device=device,
        )
        if anchor_mode == "fold":
            anchor.fold_into(base)
        layer = AdaptedLinear(base, delta, anchor)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        adapted[name] = layer
    return adapted


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """All :class:`AdaptedLinear` modules of ``model`` by full name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
