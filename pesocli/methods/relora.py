"""``relora``: ReLoRA (Lialin et al. 2023): LoRA merged and started again every ``K`` steps.

The baseline that restarts without PESO's choices (no full gradient, no alignment, no moment
rotation), so a benchmark can tell "restarting at all" from what PESO-LoRA-R adds. Before steps
``K, 2K, ...`` (never step 0; ``restarts_per_epoch`` as :mod:`pesocli.methods.schedule` spaces
them), per layer:

1. merge: ``Delta W = scale * lora_B (out, r) @ lora_A (r, in)`` goes into the layer's anchor
   (exact, the base is never written), so the model computes the same function;
2. re-init: the adapter is drawn again as LoRA draws it (:meth:`LoRADelta.reset_parameters`:
   ``lora_A`` Kaiming-uniform, ``lora_B`` zero);
3. optimizer: ``prune`` (ReLoRA's partial reset) keeps the ``1 - prune_ratio`` largest-magnitude
   entries of each moment tensor, zeros the rest and keeps the step count; ``reset`` forgets it all.
   Deviation: ReLoRA's and axolotl's code prune ``exp_avg`` and ``exp_avg_sq`` independently, so an
   entry can keep its first moment and lose its second, and Adam's step there is ``m / eps``; on the
   re-drawn ``lora_A``, whose gradient is zero until ``lora_B`` moves, nothing refills ``v``. Measured
   on SmolLM2-135M (docs/BENCHMARKS.md [real-model]): the first restart sent the loss from 3.29 to
   9.80 (pystdlib) and 2.93 to 8.50 (facts). Here a first moment is also zeroed wherever the second
   moment was pruned.

Jagged learning rate (:meth:`ReLoRA.lr_multiplier`, multiplied into the run's schedule): the step
``j`` steps after a restart runs at ``j / W`` of it, ``W = restart_warmup_steps`` (clipped to
``K``), so the restart step itself only refills the pruned moments (lr 0, as ReLoRA's
``get_cosine_schedule_with_multiple_warmups``); with ``restart_anneal_steps = A`` the step ``j``
steps before a restart runs at ``j / A`` (axolotl's ``relora_anneal_steps``).

axolotl names: ``relora_steps`` = ``restart_every``, ``relora_warmup_steps`` =
``restart_warmup_steps``, ``relora_anneal_steps`` = ``restart_anneal_steps``,
``relora_prune_ratio`` = ``prune_ratio``. Left out: the paper's full-rank warm start (a
fine-tune keeps ``W0`` frozen; axolotl leaves it out too).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pesocli.linalg import low_rank_svd
from pesocli.methods.base import MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora import LoRA, LoRADelta
from pesocli.methods.schedule import restart_due, schedule_errors
from pesocli.optim import PesoAdamW

OPTIMIZER_RESETS = ("prune", "reset")


@dataclass(kw_only=True)
class ReLoRAConfig(MethodConfig):
    restart_every: int | None = 500
    """Restart period ``K`` in optimizer steps (axolotl ``relora_steps``; ``None``: only
    ``restarts_per_epoch``)."""
    restarts_per_epoch: int | None = None
    """Evenly spaced restarts per epoch, or with ``restart_every`` a cap per epoch (none at step 0)."""
    restart_warmup_steps: int = 10
    """Linear learning-rate re-warm-up from 0 after each restart, in steps, clipped to ``K``
    (axolotl ``relora_warmup_steps``, default 10; the paper uses 50-100 with ``K`` = 5000)."""
    restart_anneal_steps: int = 0
    """Linear learning-rate anneal over the steps before each restart (axolotl
    ``relora_anneal_steps``; 0 and 1 leave the schedule alone, as axolotl's default 1 does)."""
    optimizer_reset: str = "prune"
    """At a restart: ``prune`` (keep the largest ``1 - prune_ratio`` of each moment tensor by
    magnitude, zero the rest) or ``reset`` (drop the factors' AdamW state)."""
    prune_ratio: float = 0.999
    """Fraction of each moment tensor zeroed by ``prune`` (axolotl ``relora_prune_ratio``)."""

    def validate(self) -> list[str]:
        errors = super().validate()
        errors += schedule_errors(self.restart_every, self.restarts_per_epoch)
        for key in ("restart_warmup_steps", "restart_anneal_steps"):
            if getattr(self, key) < 0:
                errors.append(f"method.{key} must be >= 0 (got {getattr(self, key)})")
        if self.optimizer_reset not in OPTIMIZER_RESETS:
            errors.append(f"method.optimizer_reset must be prune or reset (got {self.optimizer_reset!r})")
        if not 0.0 <= self.prune_ratio <= 1.0:
            errors.append(f"method.prune_ratio must be in [0, 1] (got {self.prune_ratio})")
        return errors


@torch.no_grad()
def prune_by_magnitude_(tensor: torch.Tensor, prune_ratio: float) -> int:
    """Zero all but the ``n - floor(prune_ratio * n)`` largest-magnitude entries of ``tensor`` in place.

    Exactly that many are kept (ties broken by ``torch.topk``), unlike a quantile threshold.
    Returns the number kept.
    """
    n = tensor.numel()
    keep = n - math.floor(round(prune_ratio * n, 6))  # round: 0.29 * 100 is 28.999...
    if keep >= n:
        return n
    drop = torch.ones(n, dtype=torch.bool, device=tensor.device)
    if keep > 0:
        drop[tensor.detach().abs().flatten().topk(keep).indices] = False
    tensor.masked_fill_(drop.view_as(tensor), 0.0)
    return keep


class ReLoRA(LoRA):
    """LoRA (same delta, same export) merged into the anchor and re-initialised every ``K`` steps."""

    name = "relora"
    Config = ReLoRAConfig

    def __init__(self, config: ReLoRAConfig) -> None:
        super().__init__(config)
        self.restarts_done = 0

    def restart_due(self, step: int) -> bool:
        c = self.config
        return step > 0 and restart_due(
            step, every=c.restart_every, per_epoch=c.restarts_per_epoch, steps_per_epoch=self.steps_per_epoch
        )

    def _window(self, steps: int) -> int:
        """``steps`` clipped to the shortest gap between restarts."""
        c = self.config
        gap = c.restart_every if c.restart_every is not None else self.steps_per_epoch // c.restarts_per_epoch
        return min(steps, max(gap, 1))

    def lr_multiplier(self, step: int) -> float:
        """``j / W`` at ``j < W`` steps after a restart, ``j / A`` at ``j < A`` steps before one, else 1."""
        warmup = self._window(self.config.restart_warmup_steps)
        anneal = self._window(self.config.restart_anneal_steps)
        factor = 1.0
        for j in range(min(warmup, step)):
            if self.restart_due(step - j):
                factor = j / warmup
                break
        for j in range(1, anneal):
            if self.total_steps and step + j >= self.total_steps:
                break
            if self.restart_due(step + j):
                factor = min(factor, j / anneal)
                break
        return factor

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = [self._restart_layer(ctx, name, layer) for name, layer in ctx.layers.items()]
        self.restarts_done += 1
        return records

    @torch.no_grad()
    def _restart_layer(self, ctx: RestartContext, name: str, layer) -> RestartRecord:
        start = time.perf_counter()
        c = self.config
        delta: LoRADelta = layer.delta
        up, down = delta.lora_B.detach() * delta.scale, delta.lora_A.detach()
        extra = {"restart": self.restarts_done + 1, "optimizer_reset": c.optimizer_reset}
        if not bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
            # Leave the layer as it is: the trainer's guard finds the non-finite adapter and keeps the
            # layer's old state, where a merged NaN could not be taken out of a dense anchor again.
            extra["skipped"] = "non-finite adapter"
            return RestartRecord(step=ctx.step, layer=name, method=self.name, rank=c.rank,
                                 anchor_rank=layer.anchor.rank, extra=extra)
        sigma = torch.zeros(0)
        if float(up.abs().max()) > 0:  # an adapter that never moved (lora_B = 0) adds nothing
            sigma = low_rank_svd(up.float(), down.float())[1]
            layer.anchor.absorb(up, down)
        delta.reset_parameters()
        pruned = self._reset_optimizer(ctx.optimizer, (delta.lora_A, delta.lora_B))
        extra |= {"merged_norm": float(sigma.norm()), "absorbed_singular_values": sigma.tolist(),
                  "pruned_fraction": pruned}
        return RestartRecord(
            step=ctx.step, layer=name, method=self.name, kind="restart", rank=c.rank,
            anchor_rank=layer.anchor.rank, seconds=time.perf_counter() - start, extra=extra,
        )

    def _reset_optimizer(self, optimizer: PesoAdamW, params: tuple[torch.Tensor, ...]) -> float:
        """ReLoRA's optimizer reset of one layer's factors; the fraction of moment entries now zero."""
        if self.config.optimizer_reset == "reset":
            for param in params:
                optimizer.reset_state(param)
            return 1.0
        zeros = total = 0
        for param in params:
            first, second = optimizer.moments(param)
            prune_by_magnitude_(first, self.config.prune_ratio)
            prune_by_magnitude_(second, self.config.prune_ratio)
            first.masked_fill_(second == 0, 0.0)  # no m without v: Adam would step m / eps there
            for moment in (first, second):
                zeros += int((moment == 0).sum())
                total += moment.numel()
        return zeros / max(total, 1)

    def state_dict(self) -> dict:
        return {"restarts_done": self.restarts_done}

    def load_state_dict(self, state: dict) -> None:
        self.restarts_done = int(state["restarts_done"])
