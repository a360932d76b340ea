"""``rac-lora``: Randomized Asymmetric Chain of LoRA (Malinovsky et al., RAC-LoRA).

A chain of links of ``K = restart_every`` steps. Per link and layer, one factor is drawn at random
and frozen, the other starts at zero and is trained by AdamW; when the link ends the link's
``Delta W = s lora_B lora_A`` is merged into the layer's anchor (exact, the base is never
written) and the next link draws again. With ``lora_A (r, in)`` frozen a step moves
``W`` by ``s * dB lora_A``, a step projected on the row space of ``lora_A``
(``x <- x - eta H G`` with ``H`` that space's projector in the paper's analysis).

- ``frozen``: which factor is drawn and frozen: ``random`` (a fair coin per layer and link),
  ``lora_A`` (asymmetric LoRA: train ``lora_B``) or ``lora_B`` (train ``lora_A``).
- The draw is uniform on ``(-1/sqrt(d), 1/sqrt(d))`` with ``d`` the factor's long side (``in`` for
  ``lora_A``, which is PEFT's Kaiming init, ``out`` for ``lora_B``), so either side moves ``W`` at
  the same rate. Draws come from ``seed``, the link number and the layer's position, so a
  resumed run draws the same chain.
- AdamW state is reset for both factors at every link (a new subspace and a new variable).

The first link starts at step 0 with nothing to merge. The reference code (MNIST only) merges every
``merge_frequency`` epochs; ``restarts_per_epoch`` gives that schedule.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from pesocli.linalg import low_rank_svd, principal_angles_deg
from pesocli.methods.base import MethodConfig, RestartContext, RestartRecord
from pesocli.methods.lora import LoRA, LoRADelta
from pesocli.methods.schedule import restart_due, schedule_errors

FACTORS = ("lora_A", "lora_B")


class OneSidedDelta(LoRADelta):
    """A LoRA pair (:class:`LoRADelta`: ``scale * lora_B (out, r) @ lora_A (r, in)``) with one factor frozen.

    ``trained`` names the factor that receives gradients; the other is detached in ``forward``
    (so its ``.grad`` stays ``None`` and AdamW skips it). The side is stored in the non-trainable
    parameter ``trains_lora_A`` (1.0 or 0.0), so checkpoints carry it.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, dropout: float = 0.0,
                 *, trained: str = "lora_B") -> None:
        super().__init__(out_features, in_features, rank, scale, dropout)
        self.trains_lora_A = nn.Parameter(torch.zeros(1), requires_grad=False)
        self._side: tuple[int, str] | None = None
        self.set_trained(trained)

    @property
    def trained(self) -> str:
        """``lora_A`` or ``lora_B`` (re-read from the stored flag after it is written, e.g. by a resume)."""
        version = self.trains_lora_A._version
        if self._side is None or self._side[0] != version:
            self._side = (version, "lora_A" if float(self.trains_lora_A) > 0.5 else "lora_B")
        return self._side[1]

    @property
    def frozen(self) -> str:
        return "lora_B" if self.trained == "lora_A" else "lora_A"

    @torch.no_grad()
    def set_trained(self, which: str) -> None:
        if which not in FACTORS:
            raise ValueError(f"trained factor must be lora_A or lora_B, got {which!r}")
        self.trains_lora_A.fill_(1.0 if which == "lora_A" else 0.0)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` with the frozen one detached (the forward and the fused chain use it)."""
        if self.trained == "lora_A":
            return self.lora_A, self.lora_B.detach()
        return self.lora_A.detach(), self.lora_B


@dataclass(kw_only=True)
class RacLoRAConfig(MethodConfig):
    restart_every: int | None = 500
    """Link length ``K`` in optimizer steps (``None``: only ``restarts_per_epoch``)."""
    restarts_per_epoch: int | None = None
    """Evenly spaced links per epoch, or with ``restart_every`` a cap per epoch."""
    frozen: str = "random"
    """The factor drawn and frozen per link: ``random``, ``lora_A`` or ``lora_B``."""
    seed: int = 0
    """Seed of the chain's draws (sides and frozen factors)."""

    def validate(self) -> list[str]:
        errors = super().validate()
        errors += schedule_errors(self.restart_every, self.restarts_per_epoch)
        if self.frozen not in ("random", *FACTORS):
            errors.append(f"method.frozen must be random, lora_A or lora_B (got {self.frozen!r})")
        return errors


def draw_factor(shape: tuple[int, int], long_side: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on ``(-1/sqrt(d), 1/sqrt(d))``, ``d = long_side`` (PEFT's ``lora_A`` init for ``d = in``)."""
    bound = 1.0 / math.sqrt(long_side)
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class RacLoRA(LoRA):
    name = "rac-lora"
    Config = RacLoRAConfig

    def __init__(self, config: RacLoRAConfig) -> None:
        super().__init__(config)
        self.links_done = 0

    def build_delta(self, out_features: int, in_features: int) -> OneSidedDelta:
        c = self.config
        trained = "lora_A" if c.frozen == "lora_B" else "lora_B"  # the first link is drawn at step 0
        return OneSidedDelta(out_features, in_features, c.rank, c.scale, c.dropout, trained=trained)

    def restart_due(self, step: int) -> bool:
        c = self.config
        return restart_due(step, every=c.restart_every, per_epoch=c.restarts_per_epoch,
                           steps_per_epoch=self.steps_per_epoch)

    def _generator(self, index: int) -> torch.Generator:
        key = f"{self.config.seed}:{self.links_done}:{index}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key))

    def restart(self, ctx: RestartContext) -> list[RestartRecord]:
        records = [self._new_link(ctx, index, name, layer)
                   for index, (name, layer) in enumerate(ctx.layers.items())]
        self.links_done += 1
        return records

    @torch.no_grad()
    def _new_link(self, ctx: RestartContext, index: int, name: str, layer) -> RestartRecord:
        start = time.perf_counter()
        c = self.config
        delta: OneSidedDelta = layer.delta
        old_frozen = getattr(delta, delta.frozen).detach().clone()
        old_side = delta.frozen
        up, down = delta.lora_B.detach() * delta.scale, delta.lora_A.detach()
        sigma = torch.zeros(0)
        if float(up.abs().max()) > 0 and float(down.abs().max()) > 0:  # merge the link (Algorithm 2 line 4)
            sigma = low_rank_svd(up.float(), down.float())[1]
            layer.anchor.absorb(up, down)
        generator = self._generator(index)
        if c.frozen == "random":
            frozen = FACTORS[int(torch.randint(0, 2, (1,), generator=generator))]
        else:
            frozen = c.frozen
        trained = "lora_B" if frozen == "lora_A" else "lora_A"
        frozen_param, trained_param = getattr(delta, frozen), getattr(delta, trained)
        long_side = layer.in_features if frozen == "lora_A" else layer.out_features
        frozen_param.copy_(draw_factor(tuple(frozen_param.shape), long_side, generator).to(frozen_param))
        trained_param.zero_()
        delta.set_trained(trained)
        for param in (delta.lora_A, delta.lora_B):
            ctx.optimizer.reset_state(param)
        angle = None
        if frozen == old_side and self.links_done > 0:
            pair = (old_frozen, frozen_param) if frozen == "lora_B" else (old_frozen.T, frozen_param.T)
            angle = float(principal_angles_deg(pair[0].float(), pair[1].float()).max())
        return RestartRecord(
            step=ctx.step, layer=name, method=self.name, kind="link", rank=c.rank,
            principal_angle_deg=angle, anchor_rank=layer.anchor.rank, seconds=time.perf_counter() - start,
            extra={"link": self.links_done, "frozen": frozen, "absorbed_singular_values": sigma.tolist()},
        )

    def state_dict(self) -> dict:
        return {"links_done": self.links_done}

    def load_state_dict(self, state: dict) -> None:
        self.links_done = int(state["links_done"])
