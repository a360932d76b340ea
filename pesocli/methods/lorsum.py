"""``lorsum`` (OPLoRA) and ``lorsum-scaled``: LoRA steps as proximal low-rank sub-problems.

Paper factors ``A = sqrt(s) lora_B (out, r)``, ``B = sqrt(s) lora_A (r, in)``, ``Delta W = A B``;
``G (out, in)`` is the full gradient of the layer's effective weight, ``eta`` the optimizer's
current (scheduled) learning rate. Each optimizer step, per layer (PSI-LoRA, arXiv 2509.19977):

1. step: ``(A, B) <- LoRSum(T)``, ``T = A B - eta (1 - dampening) G - eta mu M``, by proximal
   alternating least squares (:func:`pesocli.linalg.low_rank_sum`: ``sweeps`` ALS sweeps,
   ``B`` first, proximal weight ``lam = eta * lmbd`` around the current factors);
2. momentum: ``M <- LoRSum(mu M + (1 - dampening) G)`` (heavy ball, ``mu = momentum``), a rank-r
   pair ``M = momentum_up (out, r) @ momentum_down (r, in)`` kept with the same routine, so the
   state is ``A, B, M``: twice the LoRA parameters (the paper: at most 3x, like Adam).

``lorsum-scaled`` (arXiv 2602.16456, PSI-LoRA's ``ScaledOPLoraOptimizer`` with diagonal metrics)
fits ``T = A B - eta (1 - beta1) P(G) - eta beta1 P(M)`` in the metric norm
``||M_out^1/2 (.) M_in^1/2||_F`` with ``P(X) = M_out^-1 X M_in^-1``, ``M = (EMA + damping)^power``
per side: ``kfac`` (``E[x^2]`` of the layer input, ``T E[g^2]`` of the output gradient) or
``shampoo`` (the diagonals of ``G^T G`` and ``G G^T``); the momentum is an EMA,
``M <- LoRSum(beta1 M + (1 - beta1) G)``.

``G`` is never formed. A step probe (:meth:`LorSum.step_probe`, attached by
``Engine.training_step``) sees each micro-batch's layer input ``x`` and output gradient ``g``:
- ``sweeps >= 1`` keeps the step's ``x``, ``g`` rows (as PSI-LoRA's hooks do; memory
  ``tokens x (in + out)`` per layer until the update) because an ALS half-step needs products of
  ``G`` with factors computed from ``G``;
- ``sweeps = 0`` (the Jacobi step, PSI-LoRA's ``lookahead_iters = 0``) needs products with the
  current factors only, which the probe accumulates during backward: ``O((in + out) r)`` memory.

How the update reaches the weights: AdamW does not step these factors. :meth:`LorSum.before_step`
(between backward and ``optimizer.step()``) writes the new factors itself and sets their
``.grad`` to ``None``, so PesoAdamW skips them and gradient clipping does not apply to them.
The momentum and metric tensors are non-trainable parameters of the delta (so checkpoints carry
them). The factors still require grad: that keeps the autograd graph through the adapters.

Deviations from PSI-LoRA's code, each deliberate:
- ``eta`` is the step on ``W``: the authors run ALS on PEFT's raw ``lora_B lora_A`` (without
  ``s``), so their effective step is ``s * lr``.
- the scaled metrics start at zero and are bias-corrected like Adam's second moment (the authors
  start at ones without correction, which keeps the metric near the identity for the first
  ``~1/(1 - beta2)`` steps); no global gradient clipping (theirs clips ``||S^T X||``).
- a PESO restart (``restart_every``/``restarts_per_epoch``, off by default) absorbs ``A B`` into
  the layer's anchor and restarts ``A = 0`` with ``B`` spanning the momentum's row space
  (``restart_basis: momentum``) or a fresh LoRA draw (``random``); ``M`` carries over (it lives
  in weight space). Without restarts ``W - W0`` stays rank r, as in the paper.
- a loop that runs backward without ``Engine.training_step`` gives the probe nothing: the step
  then falls back to the Jacobi step from the factors' own gradients (``A^T G``, ``G B^T``)
  without momentum or metric, with a warning.
- single process only for now: under ``torch.distributed`` the thin products would have to be
  all-reduced (they are linear in ``G``) before each solve; that arrives with multi-GPU support.

The step is ``eta * G`` on the weights, SGD's scale rather than AdamW's: plain ``lorsum`` wants a
much larger ``--lr`` than LoRA (the tiny model: ~0.1-0.3 against AdamW's 1e-2, see
docs/BENCHMARKS.md); ``lorsum-scaled`` normalises ``G`` by its metric and takes AdamW-like rates.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pesocli.errors import NumericalError
from pesocli.linalg import LowRankProducts, ThinProducts, TokenGradient, low_rank_sum, low_rank_svd
from pesocli.methods.base import MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora import LoRA, LoRADelta
from pesocli.methods.schedule import restart_due


@dataclass(kw_only=True)
class LorSumConfig(MethodConfig):
    sweeps: int = 1
    """ALS sweeps per step (each updates ``B`` then ``A``); 0 = the Jacobi (preconditioned) step."""
    lmbd: float = 1e-3
    """Proximal weight per unit learning rate: ``lam = eta * lmbd`` (PSI-LoRA ``oplora_lmbd``)."""
    momentum: float = 0.9
    """Heavy-ball coefficient ``mu`` of the low-rank momentum; 0 turns the momentum off."""
    dampening: float = 0.0
    """The step and the momentum take ``(1 - dampening) G``."""
    lmbd_momentum: float | None = None
    """Proximal weight of the momentum's LoRSum (``None``: ``lmbd``)."""
    restart_every: int | None = None
    """PESO restart period ``K``: absorb ``A B`` into the anchor every ``K`` steps (``None``: never)."""
    restarts_per_epoch: int | None = None
    """Evenly spaced restarts per epoch (with ``restart_every``: a cap per epoch)."""
    restart_basis: str = "momentum"
    """Row basis of ``B`` after a restart: ``momentum`` (the momentum's rows) or ``random`` (LoRA init)."""

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.sweeps < 0:
            errors.append(f"method.sweeps must be >= 0 (got {self.sweeps})")
        if self.lmbd < 0:
            errors.append(f"method.lmbd must be >= 0 (got {self.lmbd})")
        if self.lmbd_momentum is not None and self.lmbd_momentum < 0:
            errors.append(f"method.lmbd_momentum must be >= 0 (got {self.lmbd_momentum})")
        if not 0.0 <= self.momentum < 1.0:
            errors.append(f"method.momentum must be in [0, 1) (got {self.momentum})")
        if not 0.0 <= self.dampening < 1.0:
            errors.append(f"method.dampening must be in [0, 1) (got {self.dampening})")
        if self.restart_every is not None and self.restart_every < 1:
            errors.append(f"method.restart_every (K) must be >= 1 or None (got {self.restart_every})")
        if self.restarts_per_epoch is not None and self.restarts_per_epoch < 1:
            errors.append(f"method.restarts_per_epoch must be >= 1 or None (got {self.restarts_per_epoch})")
        if self.restart_basis not in ("momentum", "random"):
            errors.append(f"method.restart_basis must be momentum or random (got {self.restart_basis!r})")
        return errors

    @property
    def momentum_coefficients(self) -> tuple[float, float, float, float]:
        """``(c_G, c_M, k_M, k_G)``: ``T = A B - eta (c_G G + c_M M)`` and ``M <- k_M M + k_G G``."""
        return 1.0 - self.dampening, self.momentum, self.momentum, 1.0 - self.dampening


@dataclass(kw_only=True)
class LorSumScaledConfig(LorSumConfig):
    momentum: float = 0.9
    """``beta1``: EMA coefficient of the low-rank momentum; 0 turns the momentum off."""
    metric: str = "kfac"
    """``kfac`` (``E[x^2]``, ``T E[g^2]``) or ``shampoo`` (diagonals of ``G^T G``, ``G G^T``)."""
    metric_power: float = 0.5
    """Fractional power ``p`` of the metric (PSI-LoRA's ``oplora_metric_power``)."""
    beta2: float = 0.99
    """EMA coefficient of the metric statistics (bias-corrected)."""
    damping: float = 1e-5
    """Added to each metric diagonal before the power."""

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.metric not in ("kfac", "shampoo"):
            errors.append(f"method.metric must be kfac or shampoo (got {self.metric!r})")
        if self.metric == "shampoo" and self.sweeps == 0:
            errors.append("method.metric: shampoo needs the cached rows of sweeps >= 1 (got sweeps 0)")
        if not 0.0 <= self.metric_power <= 1.0:
            errors.append(f"method.metric_power must be in [0, 1] (got {self.metric_power})")
        if not 0.0 <= self.beta2 < 1.0:
            errors.append(f"method.beta2 must be in [0, 1) (got {self.beta2})")
        if self.damping <= 0:
            errors.append(f"method.damping must be > 0 (got {self.damping})")
        return errors

    @property
    def momentum_coefficients(self) -> tuple[float, float, float, float]:
        return 1.0 - self.momentum, self.momentum, self.momentum, 1.0 - self.momentum


class LorSumDelta(LoRADelta):
    """A LoRA pair (see :class:`LoRADelta`) plus LoRSum's non-trainable state.

    ``momentum_up (out, r) @ momentum_down (r, in)`` is the low-rank momentum in weight space
    (unscaled); ``metric_out (out,)`` and ``metric_in (in,)`` the scaled variant's metric EMAs.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, dropout: float,
                 *, momentum: bool, metric: bool) -> None:
        super().__init__(out_features, in_features, rank, scale, dropout)
        frozen = dict(requires_grad=False)
        if momentum:
            self.momentum_up = nn.Parameter(torch.zeros(out_features, rank), **frozen)
            self.momentum_down = nn.Parameter(torch.empty(rank, in_features), **frozen)
            nn.init.kaiming_uniform_(self.momentum_down, a=math.sqrt(5))
        if metric:
            self.metric_out = nn.Parameter(torch.zeros(out_features), **frozen)
            self.metric_in = nn.Parameter(torch.zeros(in_features), **frozen)

    @property
    def has_momentum(self) -> bool:
        return hasattr(self, "momentum_up")


class StreamedProducts(ThinProducts):
    """Products of ``G`` with thin matrices fixed before the backward, accumulated on the fly.

    ``left_tests`` (each ``(out, k_i)``) and ``right_tests`` (each ``(in, k_i)``) are the test matrices;
    ``left(L)`` and ``right(R)`` answer only for ``L``/``R`` that are one of them (the same tensor
    or a view of it with the same layout): LoRSum's Jacobi step asks for nothing else.
    """

    def __init__(self, left_tests: list[torch.Tensor], right_tests: list[torch.Tensor],
                 left_products: torch.Tensor, right_products: torch.Tensor) -> None:
        self.left_tests, self.right_tests = left_tests, right_tests
        self.left_products, self.right_products = left_products, right_products

    @staticmethod
    def _find(tests: list[torch.Tensor], mat: torch.Tensor) -> slice:
        offset = 0
        for test in tests:
            same = test.data_ptr() == mat.data_ptr() and test.shape == mat.shape
            if same and test.stride() == mat.stride():
                return slice(offset, offset + test.shape[1])
            offset += test.shape[1]
        raise RuntimeError("this product with G was not accumulated during backward (use sweeps >= 1)")

    def left(self, mat):
        return self.left_products[self._find(self.left_tests, mat)]

    def right(self, mat):
        return self.right_products[:, self._find(self.right_tests, mat)]


class StepProbe:
    """What one optimizer step of LoRSum needs from each micro-batch (a ``GradientProbe``).

    ``cache``: keeps the ``x (t, in)`` and ``g (t, out)`` rows (``g`` cloned; ``x`` is the layer's
    own input, which autograd keeps unchanged). Otherwise accumulates ``L^T G`` and ``G R`` for
    the fixed ``left_tests``/``right_tests``. ``stats``: also sums ``x^2`` and ``g^2`` per feature.
    """

    def __init__(self, start: tuple[torch.Tensor, torch.Tensor],
                 momentum: tuple[torch.Tensor, torch.Tensor] | None, *, cache: bool, stats: bool) -> None:
        self.start, self.momentum = start, momentum
        self.cache, self.stats = cache, stats
        self.tokens = 0
        self.inputs: list[torch.Tensor] = []
        self.grad_outputs: list[torch.Tensor] = []
        pairs = [start] + ([momentum] if momentum is not None else [])
        self.left_tests = [up for up, _ in pairs]
        self.right_tests = [down.T for _, down in pairs]
        self.left_acc: torch.Tensor | None = None
        self.right_acc: torch.Tensor | None = None
        self.x_sq: torch.Tensor | None = None
        self.g_sq: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        g2 = grad_out.detach().reshape(-1, grad_out.shape[-1])
        self.tokens += x2.shape[0]
        if self.cache:
            self.inputs.append(x2)
            self.grad_outputs.append(g2.clone())
        else:
            xf, gf = x2.float(), g2.float()
            left = (gf @ torch.cat(self.left_tests, dim=1)).T @ xf
            right = gf.T @ (xf @ torch.cat(self.right_tests, dim=1))
            self.left_acc = left if self.left_acc is None else self.left_acc.add_(left)
            self.right_acc = right if self.right_acc is None else self.right_acc.add_(right)
        if self.stats:
            xs, gs = x2.float().square().sum(0), g2.float().square().sum(0)
            self.x_sq = xs if self.x_sq is None else self.x_sq.add_(xs)
            self.g_sq = gs if self.g_sq is None else self.g_sq.add_(gs)

    def gradient(self) -> ThinProducts:
        """``G`` of the step as a thin-product operator."""
        if self.cache:
            return TokenGradient(self.inputs, self.grad_outputs)
        return StreamedProducts(self.left_tests, self.right_tests, self.left_acc, self.right_acc)


def diagonal_gram(gradient: TokenGradient) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag(G G^T) (out,), diag(G^T G) (in,))`` of ``G = sum g_i^T x_i`` from token Grams.

    Costs ``O(T^2 (in + out))`` over ``T`` tokens, ``t_a x t_b`` memory per pair of micro-batches.
    """
    rows = cols = None
    pairs = list(zip(gradient.inputs, gradient.grad_outputs, strict=True))
    for xa, ga in pairs:
        xa, ga = xa.float(), ga.float()
        for xb, gb in pairs:
            xb, gb = xb.float(), gb.float()
            row = (ga * ((xa @ xb.T) @ gb)).sum(0)
            col = (xa * ((ga @ gb.T) @ xb)).sum(0)
            rows = row if rows is None else rows.add_(row)
            cols = col if cols is None else cols.add_(col)
    return rows, cols


class LorSum(LoRA):
    """LoRA-shaped (export as LoRA's); AdamW is replaced by the LoRSum step in :meth:`before_step`."""

    name = "lorsum"
    Config = LorSumConfig
    scaled = False

    def __init__(self, config: LorSumConfig) -> None:
        super().__init__(config)
        self.updates = 0
        self.restarts_done = 0
        self._probes: dict[str, StepProbe] = {}
        self._warned = False

    def build_delta(self, out_features: int, in_features: int) -> LorSumDelta:
        c = self.config
        return LorSumDelta(out_features, in_features, c.rank, c.scale, c.dropout,
                           momentum=c.momentum > 0, metric=self.scaled)

    # ---- the step ---------------------------------------------------------------------------------
    def step_probe(self, name: str, layer) -> StepProbe:
        delta: LorSumDelta = layer.delta
        momentum = (delta.momentum_up.detach(), delta.momentum_down.detach()) if delta.has_momentum else None
        probe = StepProbe(delta.paper_factors(), momentum, cache=self.config.sweeps > 0,
                          stats=self.scaled and self.config.metric == "kfac")
        self._probes[name] = probe
        return probe

    def before_step(self, layers, optimizer, step: int) -> None:
        eta = float(optimizer.param_groups[0]["lr"])
        probes, self._probes = self._probes, {}
        with torch.no_grad():
            for name, layer in layers.items():
                delta: LorSumDelta = layer.delta
                probe = probes.get(name)
                if probe is not None and probe.tokens > 0:
                    self._step(delta, probe, eta)
                elif delta.lora_A.grad is not None and delta.lora_B.grad is not None:
                    self._fallback_step(delta, eta)
                delta.lora_A.grad = None
                delta.lora_B.grad = None
        self.updates += 1

    def _metrics(self, delta: LorSumDelta, probe: StepProbe, gradient: ThinProducts):
        return None

    def _step(self, delta: LorSumDelta, probe: StepProbe, eta: float) -> None:
        c = self.config
        gradient = probe.gradient()
        metrics = self._metrics(delta, probe, gradient)
        c_grad, c_mom, m_keep, m_grad = c.momentum_coefficients
        terms: list[tuple[float, ThinProducts]] = [(-eta * c_grad, gradient)]
        if probe.momentum is not None:
            terms.append((-eta * c_mom, LowRankProducts(*probe.momentum)))
        up, down = low_rank_sum(probe.start, 1.0, terms, sweeps=c.sweeps, lam=eta * c.lmbd, metrics=metrics)
        if not bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise NumericalError(f"{self.name} diverged (non-finite factors after update {self.updates + 1});"
                                 " lower --lr (the step is eta * G on the weights, not an Adam step)")
        delta.set_product(up, down)
        if probe.momentum is not None:
            lam_m = eta * (c.lmbd if c.lmbd_momentum is None else c.lmbd_momentum)
            m_up, m_down = low_rank_sum(probe.momentum, m_keep, [(m_grad, gradient)], sweeps=c.sweeps,
                                        lam=lam_m)
            delta.momentum_up.copy_(m_up)
            delta.momentum_down.copy_(m_down)

    def _fallback_step(self, delta: LorSumDelta, eta: float) -> None:
        if not self._warned:
            warnings.warn(f"{self.name}: no step probe saw this backward (run it inside "
                          "Engine.training_step()); falling back to the Jacobi step from the factors' "
                          "gradients, without momentum", RuntimeWarning, stacklevel=3)
            self._warned = True
        root = math.sqrt(delta.scale)
        a, b = delta.paper_factors()
        # d loss / d lora_A = s lora_B^T G = sqrt(s) A^T G;  d loss / d lora_B = sqrt(s) G B^T
        gradient = StreamedProducts([a], [b.T], delta.lora_A.grad.float() / root,
                                    delta.lora_B.grad.float() / root)
        c = self.config
        up, down = low_rank_sum((a, b), 1.0, [(-eta, gradient)], sweeps=0, lam=eta * c.lmbd)
        delta.set_product(up, down)

    # ---- PESO restarts (off by default) -----------------------------------------------------------
    def restart_due(self, step: int) -> bool:
        c = self.config
        if step == 0 or (c.restart_every is None and c.restarts_per_epoch is None):
            return False
        return restart_due(step, every=c.restart_every, per_epoch=c.restarts_per_epoch,
                           steps_per_epoch=self.steps_per_epoch)

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = []
        for name, layer in ctx.layers.items():
            start = time.perf_counter()
            delta: LorSumDelta = layer.delta
            a, b = delta.paper_factors()
            _, sigma, _ = low_rank_svd(a.float(), b.float())
            layer.anchor.absorb(a, b)
            delta.set_product(torch.zeros_like(a), self._restart_down(delta, b))
            records.append(RestartRecord(
                step=ctx.step, layer=name, method=self.name, kind="restart", rank=self.config.rank,
                anchor_rank=layer.anchor.rank, seconds=time.perf_counter() - start,
                extra={"absorbed_singular_values": sigma.tolist(),
                       "restart_basis": self.config.restart_basis},
            ))
        self.restarts_done += 1
        return records

    def _restart_down(self, delta: LorSumDelta, down: torch.Tensor) -> torch.Tensor:
        """The new ``B (r, in)``: orthonormal rows (momentum's or random) with LoRA-init row norms."""
        rows = delta.momentum_down if self.config.restart_basis == "momentum" and delta.has_momentum else None
        if rows is None or float(rows.norm()) == 0.0:
            rows = torch.empty_like(down)
            nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        basis = torch.linalg.qr(rows.float().T)[0].T  # (r, in), orthonormal rows
        return basis * math.sqrt(delta.scale / 3.0)  # kaiming-uniform rows have norm ~ 1/sqrt(3)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"updates": self.updates, "restarts_done": self.restarts_done}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.restarts_done = int(state["restarts_done"])


class LorSumScaled(LorSum):
    """``lorsum-scaled``: LoRSum in a diagonal K-FAC/Shampoo metric with a fractional power."""

    name = "lorsum-scaled"
    Config = LorSumScaledConfig
    scaled = True

    def _metrics(self, delta: LorSumDelta, probe: StepProbe, gradient: ThinProducts):
        c = self.config
        tokens = probe.tokens
        if c.metric == "kfac":
            stat_out, stat_in = probe.g_sq * tokens, probe.x_sq / tokens
        else:
            rows, cols = diagonal_gram(gradient)
            stat_out, stat_in = rows * tokens, cols * tokens
        delta.metric_out.mul_(c.beta2).add_(stat_out, alpha=1.0 - c.beta2)
        delta.metric_in.mul_(c.beta2).add_(stat_in, alpha=1.0 - c.beta2)
        correction = 1.0 - c.beta2 ** (self.updates + 1)
        return tuple((m / correction + c.damping).pow(c.metric_power)
                     for m in (delta.metric_out, delta.metric_in))
