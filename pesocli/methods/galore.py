"""``galore``: the projected subspace of Table 1 (Zhao et al. 2024), written through the anchor.

``M_k(R) = s P_k R`` (left: ``P_k (out, r)`` frozen = ``lora_B``, ``R (r, in)`` trained = ``lora_A``)
or ``s R Q_k`` (right: ``Q_k (r, in)`` frozen = ``lora_A``, ``R (out, r)`` trained = ``lora_B``),
``s = galore_scale``. AdamW on ``R`` sees ``grad_R = s P^T G`` (or ``s G Q^T``), so its moments
live in the projected space and a step moves ``W`` by ``s P adam(P^T G)``: GaLore's
``project -> Adam -> project_back * scale`` (Appendix C, eq. 12 with Adam). Every
``K = restart_every`` steps (step 0 included) the subspace restarts (eq. 6): ``s P R`` is
absorbed into the layer's anchor (the base, quantised or not, is never written), the projector
becomes the top-r left (right) singular vectors of the full gradient, and ``R = 0``.

Following GaLore's code (``galore_torch`` 1.0): ``proj_side: auto`` projects on the right when
``out >= in`` and on the left otherwise (the smaller state); AdamW moments are kept unchanged
across subspace changes (``moments: keep``; GaLore issue #54), or rotated into the new basis
(``rotate``: ``m <- P_new^T P_old m``, second moment kept) or reset (``reset``).

``method.alpha`` plays no part (``galore_scale`` is the delta's scale).

Deviations: the SVD is the randomised sketch of ``pesocli.fullgrad`` over the restart
micro-batches (``fullgrad.mode: exact`` gives GaLore's dense SVD on small models); AdamW's weight
decay, if any, decays ``R``, not ``W`` as GaLore does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pesocli.linalg import principal_angles_deg
from pesocli.methods.base import MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora import LoRA
from pesocli.methods.rac_lora import OneSidedDelta
from pesocli.methods.schedule import restart_due, schedule_errors


@dataclass(kw_only=True)
class GaLoreConfig(MethodConfig):
    restart_every: int | None = 200
    """Subspace update period ``K`` (GaLore's ``update_proj_gap``; README 200, code default 50)."""
    restarts_per_epoch: int | None = None
    """Evenly spaced subspace updates per epoch, or with ``restart_every`` a cap per epoch."""
    galore_scale: float = 1.0
    """GaLore's ``scale``, replacing ``alpha / r`` (its code's default; README: 0.25 pre-training, 4 GLUE)."""
    proj_side: str = "auto"
    """``auto`` (right when ``out >= in``, GaLore's ``std``), ``left`` or ``right``."""
    moments: str = "keep"
    """AdamW moments at a subspace update: ``keep`` (GaLore's code), ``rotate`` or ``reset``."""

    @property
    def scale(self) -> float:
        return self.galore_scale

    def validate(self) -> list[str]:
        errors = super().validate()
        errors += schedule_errors(self.restart_every, self.restarts_per_epoch)
        if self.galore_scale <= 0:
            errors.append(f"method.galore_scale must be > 0 (got {self.galore_scale})")
        if self.proj_side not in ("auto", "left", "right"):
            errors.append(f"method.proj_side must be auto, left or right (got {self.proj_side!r})")
        if self.moments not in ("keep", "rotate", "reset"):
            errors.append(f"method.moments must be keep, rotate or reset (got {self.moments!r})")
        return errors


def projection_side(cfg: GaLoreConfig, out_features: int, in_features: int) -> str:
    """``left`` (project ``P^T G``, train ``lora_A``) or ``right`` (``G Q^T``, train ``lora_B``)."""
    if cfg.proj_side != "auto":
        return cfg.proj_side
    return "right" if out_features >= in_features else "left"


class GaLore(LoRA):
    name = "galore"
    Config = GaLoreConfig
    needs_full_gradient = True

    def __init__(self, config: GaLoreConfig) -> None:
        super().__init__(config)
        self.updates_done = 0

    def build_delta(self, out_features: int, in_features: int) -> OneSidedDelta:
        c = self.config
        side = projection_side(c, out_features, in_features)
        delta = OneSidedDelta(out_features, in_features, c.rank, c.scale, c.dropout,
                              trained="lora_A" if side == "left" else "lora_B")
        with torch.no_grad():  # a random orthonormal projector until the first SVD (step 0)
            if side == "left":
                delta.lora_B.copy_(torch.linalg.qr(torch.randn(out_features, c.rank))[0])
                delta.lora_A.zero_()
            else:
                delta.lora_A.copy_(torch.linalg.qr(torch.randn(in_features, c.rank))[0].T)
                delta.lora_B.zero_()
        return delta

    def restart_due(self, step: int) -> bool:
        c = self.config
        return restart_due(step, every=c.restart_every, per_epoch=c.restarts_per_epoch,
                           steps_per_epoch=self.steps_per_epoch)

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = [self._update_subspace(ctx, name, layer) for name, layer in ctx.layers.items()]
        self.updates_done += 1
        return records

    @torch.no_grad()
    def _update_subspace(self, ctx: RestartContext, name: str, layer) -> RestartRecord:
        start = time.perf_counter()
        c = self.config
        delta: OneSidedDelta = layer.delta
        left = delta.trained == "lora_A"
        trained = delta.lora_A if left else delta.lora_B
        if float(trained.abs().max()) > 0:  # W~ <- W~ + M_k(R) (eq. 6)
            layer.anchor.absorb(delta.lora_B.detach() * delta.scale, delta.lora_A.detach())
        estimate = ctx.gradients[name]
        u, s, v = estimate.top_r(c.rank)
        old = (delta.lora_B if left else delta.lora_A.T).detach().float().clone()  # (out, r) or (in, r)
        new = u if left else v
        if left:
            delta.lora_B.copy_(u)
        else:
            delta.lora_A.copy_(v.T)
        trained.zero_()
        self._transfer_moments(ctx.optimizer, trained, old, new, left)
        angle = float(principal_angles_deg(old, new).max()) if self.updates_done > 0 else None
        return RestartRecord(
            step=ctx.step, layer=name, method=self.name, kind="subspace", rank=c.rank,
            top_singular_values=s.tolist(), captured_energy=estimate.captured_energy(c.rank),
            principal_angle_deg=angle, anchor_rank=layer.anchor.rank, seconds=time.perf_counter() - start,
            extra={"side": "left" if left else "right", "moments": c.moments},
        )

    def _transfer_moments(self, optimizer, trained, old: torch.Tensor, new: torch.Tensor, left: bool) -> None:
        if self.config.moments == "reset":
            optimizer.reset_state(trained)
        elif self.config.moments == "rotate" and optimizer.step_count(trained) > 0:
            m, _ = optimizer.moments(trained)
            rotation = (new.T @ old).to(m.dtype)  # P_new^T P_old (r, r)
            m.copy_(rotation @ m if left else m @ rotation.T)

    def state_dict(self) -> dict:
        return {"updates_done": self.updates_done}

    def load_state_dict(self, state: dict) -> None:
        self.updates_done = int(state["updates_done"])
