"""``peso-r``: PESO-LoRA-R, LoRA with full-gradient restarts (Algorithm 5 + Appendix D).

Schedule: a restart precedes step 0 and then every ``K = restart_every`` steps (and/or
``restarts_per_epoch`` times per epoch; see :mod:`pesocli.methods.schedule`).

Step 0 (no history yet) is LoRA-One's initialisation with ``gamma`` (Appendix F: "when k = 0,
the scale parameter is set the same as in LoRA-One"). Every later restart, per layer, with
paper factors ``A = sqrt(s) lora_B (out, r)``, ``B = sqrt(s) lora_A (r, in)`` and the top-r SVD
``-G ~ U Sigma V^T`` of the (sketched) full gradient:

1. D.1 bases: ``A = Q_A R_A``, ``B^T = Q_B R_B``; Procrustes-aligned ``U^ = U R_U^T``,
   ``V^ = V R_V^T``; EMA ``U_ema = tau1 Q_A + (1 - tau1) U^`` (same for ``V``).
2. D.1 scaling: ``S_new = tau2 U_ema^T (A B) V_ema - (1 - tau2) / gamma_later U_ema^T G V_ema``,
   refactorised by SVD with a balanced split: ``A_new = U_ema R_L Sigma^1/2``,
   ``B_new = Sigma^1/2 R_R^T V_ema^T``.
3. Anchor (Algorithm 5 line 5) - see ``anchor_update`` below.
4. D.1 momentum rotation ``m_A <- m_A T_A``, ``m_B <- T_B^T m_B`` with ``T_A = Q_A^T U_ema``,
   ``T_B = Q_B^T V_ema``.
5. D.2 at the first step after the restart (:meth:`PesoR.before_update`): ``v <- (||g||^2 / ||v||) v``,
   ``m <- (||g|| / ||m||) m`` with RMS norms, and ``beta2`` cosine warm-up from ``beta2_min``
   (0.95) to the optimizer's ``beta2`` over ``T = floor(K / 3)`` updates. ``g`` is the gradient
   AdamW uses at that step: after clipping (D.2 sizes the moments to it; rescaling from the raw
   gradient and then clipping would leave ``v`` too hot by the clip factor squared).

Deviations, each a switch:
- ``transport_moments`` (default on) replaces step 4's rotation: the moments are carried by the change
  of factor coordinates ``pinv(B^T) B_new^T`` / ``pinv(A) A_new``, exact when the bases do not turn.
  D.1's ``T_A = Q_A^T U_ema`` accounts for the turn of the bases but not for the SVD re-split of the
  factors inside them, which measured as what a restart cost on a real model (the field's docstring).
- D.2 (``rescale_moments``, ``beta2_warmup``) is off by default: measured on a real model, it is
  what kept the loss from falling after a restart (see the two fields). ``true`` for both is the paper.
- ``factor_split``: the balanced split gives both new factors the norm ``sqrt(||S_new||_*)``. LoRA's
  ``lora_A`` keeps about its init norm ``sqrt(r / 3)`` while ``lora_B`` grows from 0, so a small
  adapter product split evenly has factors several times smaller than LoRA's; under Adam (which
  moves every entry by about ``lr``) the product then moves that many times slower, and the
  moments, sized for the old factors' gradients, no longer match. ``keep-ratio`` keeps the old
  adapter's ``||A|| / ||B||`` (the product is the same); ``balanced`` is the paper. peso-r's own
  factors are balanced from the start (LoRA-One's init), so on SmolLM2-135M the two measured equal.
- ``bias_correction``: Algorithm 5 divides ``v`` by ``1 - beta2^k`` at every step ``k``, and D.2
  rescales the raw ``v`` to ``||g||^2`` and refills it at ``beta2 = 0.95``. Both make the raw ``v``
  a full-weight average of ``g^2``, which the ``1 - 0.999^k`` correction then inflates by
  ``1 / (1 - 0.999^k)``: 17x at ``k = 60``, 1.6x at ``k = 1000``. In the paper's long runs the
  factor is near 1; in a run of a few hundred steps every restart cuts the step by
  ``sqrt(1 - 0.999^k)`` (4x at ``k = 60``) for the rest of the run. ``paper`` keeps Algorithm 5;
  ``tracked`` sizes the bias-corrected moments and corrects by the weight the EMA really has.
- ``orthonormal_ema`` (default on): ``U_ema``/``V_ema`` are replaced by their nearest
  orthonormal matrices (polar factor). The paper's EMA of two orthonormal bases is not
  orthonormal, so ``U_ema^T (A B) V_ema`` would not be a projection. Off = as written.
- ``anchor_update``: the paper absorbs the whole old adapter ``A B`` into the anchor *and*
  puts ``tau2`` times its projection back into ``(A_new, B_new)``, so the model counts it
  ``1 + tau2`` times. ``paper`` does exactly that. ``continuous`` absorbs
  ``A B - tau2 U_ema S_old V_ema^T`` instead, so a restart moves the model only by the
  projected gradient step ``(1 - tau2) / gamma_later U_ema^T(-G)V_ema``. The default is the
  one that measured better; see ``docs/BENCHMARKS.md`` ("peso-r anchor update") and
  ``scripts/anchor_variants.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pesocli.linalg import balanced_split, orthonormal_basis, principal_angles_deg, procrustes_align, rms
from pesocli.methods.base import RestartContext, RestartRecord
from pesocli.methods.lora import LoRA, LoRADelta
from pesocli.methods.lora_one import LoRAOneConfig, lora_one_factors, negated_top_r
from pesocli.methods.schedule import restart_due, schedule_errors


@dataclass(kw_only=True)
class PesoRConfig(LoRAOneConfig):
    anchor_max_rank: int | None = 16
    """peso-r caps its low-rank anchor at rank 16 by default (``null``: exact, growing by ``2r`` per
    restart up to ``anchor_rank_cap``), so a step costs the same after 16 restarts as after one
    (docs/BENCHMARKS.md [perf]: after 16 restarts on SmolLM2-135M 0.99-1.09 x lora's step against
    1.36-1.59 uncapped, memory 1.024 x against 1.31; at 4096-wide layers the rank-16 chain is ~0.8%
    of a layer's FLOPs). Chosen on SmolLM2-135M's quality benchmark ([real-model]): facts recall
    0.758 capped vs 0.742 exact (seed 0, lr 2e-3; 0.967 vs 1.000 at lr 4e-3), pystdlib held-out
    perplexity 18.006 vs 18.006; facts over three seeds 0.794 +- 0.029 capped vs 0.789 +- 0.037 exact.
    Each restart's dropped energy is in ``restarts.jsonl``."""
    restart_every: int | None = 500
    """Restart frequency ``K`` in optimizer steps (``None``: only ``restarts_per_epoch``)."""
    restarts_per_epoch: int | None = None
    """Evenly spaced restarts per epoch, or with ``restart_every`` a cap per epoch."""
    gamma_later: float = 1.0
    """``gamma`` of every restart after the first (Appendix F: 1)."""
    tau1: float = 0.9
    """EMA weight of the old bases (Appendix D.1)."""
    tau2: float = 0.9
    """EMA weight of the old adapter's scaling (Appendix D.1)."""
    beta2_warmup: bool = False
    """Lower ``beta2`` to ``beta2_min`` after each restart and warm it back up over ``beta2_window``
    updates (D.2). Off by default: see ``rescale_moments``."""
    beta2_min: float = 0.95
    """``beta2`` right after a restart (D.2, with ``beta2_warmup``)."""
    beta2_window: int | None = None
    """``beta2`` warm-up length ``T`` (default ``floor(K / 3)``)."""
    anchor_update: str = "continuous"
    """``continuous`` (model moves only by the gradient step) or ``paper`` (absorb all of ``AB``)."""
    orthonormal_ema: bool = True
    """Replace the EMA bases by their nearest orthonormal matrices (deviation, see module doc)."""
    rotate_momentum: bool = True
    """Carry the first moments into the new factors: by D.1's ``T_A``, ``T_B`` when
    ``transport_moments`` is off, by the coordinate transport when it is on."""
    rotate_second_moment: bool = False
    """Also carry ``v`` into the new bases, ``v_A <- v_A (T_A o T_A)``, ``v_B <- (T_B o T_B)^T v_B``
    (``o``: elementwise product), the second moment of ``g T`` if the coordinates of ``g`` were
    independent. Not in the paper (D.1 rotates ``m`` only and leaves ``v`` in the old coordinates)."""
    transport_moments: bool = True
    """Carry the moments by the change of factor coordinates instead of D.1's ``T_A``, ``T_B``:
    ``m_A <- m_A C_A`` with ``C_A = pinv(B^T) B_new^T`` and ``m_B <- C_B^T m_B`` with
    ``C_B = pinv(A) A_new`` (``v`` by the squared entries, with ``rotate_second_moment``). A moment
    ``m_A = M B^T`` of a full-gradient average ``M`` becomes ``M P_B B_new^T`` (``P_B`` the projection on
    the old row space): exact when the subspace does not turn (``tau1 = 1``), where D.1's ``T = I``
    leaves the moments tied to the old columns although the SVD re-split changed them. Not in the paper;
    on by default: on SmolLM2-135M (facts, seed 0, ``scripts/quality_real.py``, docs/BENCHMARKS.md
    [real-model] second pass) it lifted recall from 0.458 to 0.742 (lora 0.892) and the loss after
    every restart (restart 91: 0.72 -> 0.63 with D.1's rotation, 0.58 -> 0.39 with it). ``false`` is
    the paper's D.1 rotation (``rotate_momentum``)."""
    reset_moments: bool = False
    """Forget both moments of ``A`` and ``B`` at every restart after the first (Adam restarts with its
    own bias correction, as at step 0); replaces ``rotate_momentum``, ``rotate_second_moment`` and D.2.
    Not in the paper: a check of whether the carried moments help or hurt after a re-factorisation."""
    rescale_moments: bool = False
    """RMS-rescale moments from the first post-restart gradient (D.2). Off by default, with
    ``beta2_warmup``: on SmolLM2-135M (``scripts/quality_real.py``, facts task, docs/BENCHMARKS.md
    [real-model]) D.2 as written cut exact-match recall from 0.46 to 0.19 (lora: 0.89); each half
    alone kept it at 0.18-0.21, and sizing the bias-corrected moments (``bias_correction: tracked``)
    made the steps after a restart unstable (grad-norm spikes, 0.22)."""
    factor_split: str = "balanced"
    """How ``S_new`` is split into factors (D.1). ``balanced``: ``A_new = U_ema R_L Sigma^1/2``,
    ``B_new = Sigma^1/2 R_R^T V_ema^T`` (the paper). ``keep-ratio``: the same product with
    ``||A_new|| / ||B_new||`` equal to the old adapter's ``||A|| / ||B||`` (see the module docstring).
    Measured on SmolLM2-135M: the same recall to the last digit as ``balanced`` (peso-r's factors start
    balanced from LoRA-One's init and Adam keeps them so), so the default stays the paper's."""
    bias_correction: str = "paper"
    """How D.2 meets Adam's bias correction. ``paper``: the raw moments are rescaled
    (``v <- (||g||^2 / ||v||) v``) and the correction stays ``1 - beta2_final^t`` through the ``beta2``
    warm-up (Algorithm 5 lines 14-15). ``tracked``: the rescale sizes the *bias-corrected* moments to
    the gradient, and the correction follows the ``beta2`` actually used (``1 - prod beta2(t)``);
    see the module docstring for why the two differ early in a run."""

    def validate(self) -> list[str]:
        errors = super().validate()
        errors += schedule_errors(self.restart_every, self.restarts_per_epoch)
        for key in ("tau1", "tau2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                errors.append(f"method.{key} must be in [0, 1] (got {getattr(self, key)})")
        if self.gamma_later <= 0:
            errors.append(f"method.gamma_later must be > 0 (got {self.gamma_later})")
        if not 0.0 < self.beta2_min < 1.0:
            errors.append(f"method.beta2_min must be in (0, 1) (got {self.beta2_min})")
        if self.factor_split not in ("balanced", "keep-ratio"):
            errors.append(f"method.factor_split must be balanced or keep-ratio (got {self.factor_split!r})")
        if self.bias_correction not in ("paper", "tracked"):
            errors.append(f"method.bias_correction must be paper or tracked (got {self.bias_correction!r})")
        if self.anchor_update not in ("continuous", "paper"):
            errors.append(f"method.anchor_update must be continuous or paper (got {self.anchor_update!r})")
        return errors


def nearest_orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Polar factor ``P Q^T`` of ``matrix = P Sigma Q^T`` (the closest matrix with orthonormal columns)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


@dataclass
class AlignedRestart:
    """The result of D.1 for one layer (all in the paper's orientation)."""

    a_new: torch.Tensor  # (out, r)
    b_new: torch.Tensor  # (r, in)
    absorb_up: torch.Tensor  # (out, k)
    absorb_down: torch.Tensor  # (k, in)
    rotate_a: torch.Tensor  # T_A (r, r)
    rotate_b: torch.Tensor  # T_B (r, r)
    old_basis: torch.Tensor  # Q_A (out, r)


def align_restart(a: torch.Tensor, b: torch.Tensor, estimate, cfg: PesoRConfig) -> AlignedRestart:
    """Appendix D.1 for one layer: ``a (out, r)``, ``b (r, in)`` are the paper's ``A``, ``B``."""
    rank = a.shape[1]
    q_a, _ = orthonormal_basis(a)
    q_b, _ = orthonormal_basis(b.T)
    u, _, v = negated_top_r(estimate, rank)
    u_ema = cfg.tau1 * q_a + (1 - cfg.tau1) * procrustes_align(u, q_a)
    v_ema = cfg.tau1 * q_b + (1 - cfg.tau1) * procrustes_align(v, q_b)
    if cfg.orthonormal_ema:
        u_ema, v_ema = nearest_orthonormal(u_ema), nearest_orthonormal(v_ema)
    s_old = (u_ema.T @ a) @ (b @ v_ema)
    s_grad = -estimate.project(u_ema, v_ema) / cfg.gamma_later
    left, right = balanced_split(cfg.tau2 * s_old + (1 - cfg.tau2) * s_grad)
    if cfg.factor_split == "keep-ratio":  # ||A_new|| / ||B_new|| = ||A|| / ||B||, same product
        ratio = math.sqrt(float(a.norm()) / float(b.norm()))
        left, right = left * ratio, right / ratio
    if cfg.anchor_update == "paper":
        absorb_up, absorb_down = a, b
    else:
        absorb_up = torch.cat([a, -cfg.tau2 * (u_ema @ s_old)], dim=1)
        absorb_down = torch.cat([b, v_ema.T], dim=0)
    return AlignedRestart(
        a_new=u_ema @ left,
        b_new=right @ v_ema.T,
        absorb_up=absorb_up,
        absorb_down=absorb_down,
        rotate_a=q_a.T @ u_ema,
        rotate_b=q_b.T @ v_ema,
        old_basis=q_a,
    )


class PesoR(LoRA):
    """LoRA (same delta, same export) with full-gradient restarts every ``K`` steps."""

    name = "peso-r"
    Config = PesoRConfig
    needs_full_gradient = True

    def __init__(self, config: PesoRConfig) -> None:
        super().__init__(config)
        self.restarts_done = 0
        self.rescale_pending = False

    def restart_due(self, step: int) -> bool:
        c = self.config
        return restart_due(
            step, every=c.restart_every, per_epoch=c.restarts_per_epoch, steps_per_epoch=self.steps_per_epoch
        )

    @property
    def beta2_window(self) -> int:
        c = self.config
        if c.beta2_window is not None:
            return c.beta2_window
        k = c.restart_every or max(self.steps_per_epoch // (c.restarts_per_epoch or 1), 1)
        return k // 3

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        first = self.restarts_done == 0
        records = [self._restart_layer(ctx, name, layer, first) for name, layer in ctx.layers.items()]
        self.restarts_done += 1
        self.rescale_pending = not first and self.config.rescale_moments and not self.config.reset_moments
        return records

    def _restart_layer(self, ctx: RestartContext, name: str, layer, first: bool) -> RestartRecord:
        c = self.config
        start = time.perf_counter()
        delta: LoRADelta = layer.delta
        estimate = ctx.gradients[name]
        opt = ctx.optimizer
        a, b = delta.paper_factors()
        angle, extra = None, {"anchor_update": c.anchor_update}
        if first or float(a.norm()) == 0.0 or float(b.norm()) == 0.0:
            u, s, v = negated_top_r(estimate, c.rank)
            lora_b, lora_a = lora_one_factors(u, s, v, c.gamma)
            with torch.no_grad():
                delta.lora_B.copy_(lora_b)
                delta.lora_A.copy_(lora_a)
            for param in delta.parameters():
                opt.reset_state(param)
            kind = "init"
        else:
            a, b = a.float(), b.float()
            aligned = align_restart(a, b, estimate, c)
            layer.anchor.absorb(aligned.absorb_up, aligned.absorb_down)
            delta.set_product(aligned.a_new, aligned.b_new)
            if c.reset_moments:
                for param in (delta.lora_A, delta.lora_B):
                    opt.reset_state(param)
            else:
                maps = (transport_maps(a, b, aligned.a_new, aligned.b_new) if c.transport_moments
                        else (aligned.rotate_a, aligned.rotate_b))
                carry_moments(opt, delta, maps, first=c.rotate_momentum,
                              second=c.rotate_second_moment)
                if c.beta2_warmup:
                    for param in (delta.lora_A, delta.lora_B):
                        opt.set_beta2_warmup(param, self.beta2_window, c.beta2_min,
                                             tracked=c.bias_correction == "tracked")
            u, s, _ = negated_top_r(estimate, c.rank)
            # what the restart explores: the old adapter subspace vs the new gradient's top-r subspace;
            # the adapter itself turns only part of the way (tau1), recorded as adapter_rotation_deg
            angle = float(principal_angles_deg(aligned.old_basis, u).max())
            rotation = principal_angles_deg(aligned.old_basis, aligned.a_new)
            extra["adapter_rotation_deg"] = float(rotation.max())
            kind = "restart"
        return RestartRecord(
            step=ctx.step,
            layer=name,
            method=self.name,
            kind=kind,
            rank=c.rank,
            top_singular_values=s.tolist(),
            captured_energy=estimate.captured_energy(c.rank),
            principal_angle_deg=angle,
            anchor_rank=layer.anchor.rank,
            seconds=time.perf_counter() - start,
            extra={"gamma": c.gamma if kind == "init" else c.gamma_later, **extra},
        )

    def before_update(self, layers, optimizer, step: int) -> None:
        """D.2 from the clipped gradient of the first step after a restart (see the module docstring)."""
        if not self.rescale_pending:
            return
        self.rescale_pending = False
        for layer in layers.values():
            for param in (layer.delta.lora_A, layer.delta.lora_B):
                if param.grad is None:
                    continue
                rescale_moments(optimizer, param, param.grad,
                                bias_corrected=self.config.bias_correction == "tracked")

    def state_dict(self) -> dict:
        return {"restarts_done": self.restarts_done, "rescale_pending": self.rescale_pending}

    def load_state_dict(self, state: dict) -> None:
        self.restarts_done = int(state["restarts_done"])
        self.rescale_pending = bool(state["rescale_pending"])


def transport_maps(
    a: torch.Tensor, b: torch.Tensor, a_new: torch.Tensor, b_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_A, C_B)``, both (r, r): ``C_A = pinv(B^T) B_new^T``, ``C_B = pinv(A) A_new`` for paper factors
    ``A`` (out, r), ``B`` (r, in) before and after a restart (see ``transport_moments``)."""
    c_a = torch.linalg.pinv(b.double().T) @ b_new.double().T
    c_b = torch.linalg.pinv(a.double()) @ a_new.double()
    return c_a.float(), c_b.float()


def carry_moments(
    opt, delta: LoRADelta, maps: tuple[torch.Tensor, torch.Tensor], *, first: bool, second: bool
) -> None:
    """Moments into the new factors: ``m_A <- m_A T_A``, ``m_B <- T_B^T m_B`` (``first``; D.1's
    ``T_A``, ``T_B`` or :func:`transport_maps`), and with ``second`` the same map on ``v`` with the
    squared entries of ``T`` (a second moment stays non-negative). ``lora_B`` (out, r) is the paper's
    ``A``, ``lora_A`` (r, in) its ``B``."""
    if not (first or second):
        return
    t_a, t_b = maps
    m_b, v_b = opt.moments(delta.lora_B)
    m_a, v_a = opt.moments(delta.lora_A)
    if first:
        m_b.copy_(m_b @ t_a.to(m_b.dtype))
        m_a.copy_(t_b.T.to(m_a.dtype) @ m_a)
    if second:
        v_b.copy_(v_b @ t_a.square().to(v_b.dtype))
        v_a.copy_(t_b.square().T.to(v_a.dtype) @ v_a)


def rescale_moments(
    optimizer, param: torch.Tensor, grad: torch.Tensor, *, bias_corrected: bool = False
) -> tuple[float, float]:
    """D.2: ``v <- (||g||^2 / ||v||) v`` and ``m <- (||g|| / ||m||) m`` with RMS norms.

    ``bias_corrected``: size the moments the optimizer reads, ``m / c1`` and ``v / c2``
    (:meth:`~pesocli.optim.PesoAdamW.bias_corrections`), to ``g`` instead of the raw ones; with
    ``c1, c2 < 1`` (any run shorter than ``1 / (1 - beta2)`` steps) the raw rescale leaves ``v / c2``
    ``1 / c2`` times larger than ``g^2``, i.e. steps ``sqrt(c2)`` times too short.
    Returns the factors ``(s_m, s_v)`` (1.0 where a moment is zero and is left alone).
    """
    m, v = optimizer.moments(param)
    c1, c2 = optimizer.bias_corrections(param) if bias_corrected else (1.0, 1.0)
    if c1 <= 0 or c2 <= 0:  # no update yet: nothing to correct
        c1, c2 = 1.0, 1.0
    g = rms(grad)
    rm, rv = rms(m) / c1, rms(v) / c2
    s_m = g / rm if rm > 0 and math.isfinite(g / rm) else 1.0
    s_v = g * g / rv if rv > 0 and math.isfinite(g * g / rv) else 1.0
    m.mul_(s_m)
    v.mul_(s_v)
    return s_m, s_v
