"""AdamW with exposed per-tensor state, for restart alignment (Appendix D.2).

:class:`PesoAdamW` is a real ``torch.optim.Optimizer`` and computes exactly what
``torch.optim.AdamW`` computes (decoupled weight decay, bias correction with the per-tensor
step count) until someone changes its state. Methods touch that state only through
:meth:`PesoAdamW.moments`, :meth:`PesoAdamW.reset_state`, :meth:`PesoAdamW.set_beta2_warmup` and
:meth:`PesoAdamW.set_step_count` (a tensor whose bias correction follows a global step).

``beta2`` warm-up (D.2): after a restart at update ``t_r`` the tensor uses
``beta2(t) = b_min + (b_final - b_min) (1 - cos(pi (t - t_r) / T)) / 2`` for
``t_r <= t <= t_r + T`` and ``b_final`` (the group's ``beta2``) afterwards. Bias correction keeps
``1 - b_final^t`` as Algorithm 5 lines 14-15 write it, unless the warm-up is ``tracked``: then it is
the EMA's real weight ``1 - prod beta2(t)`` (:meth:`PesoAdamW.set_beta2_warmup`). Early in a run
(``t << 1 / (1 - b_final)``) the two differ a lot: an EMA filled at ``beta2 = 0.95`` divided by
``1 - 0.999^t`` is ``1 / (1 - 0.999^t)`` times too large (17x at ``t = 60``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pesocli.linalg import cosine_ramp


class PesoAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) with read/write access to each tensor's moments."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    # ---- state API used by restarts -------------------------------------------------------
    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def moments(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of ``param`` (zeros when it has no state yet); edit in place."""
        state = self._state(param)
        return state["exp_avg"], state["exp_avg_sq"]

    def step_count(self, param: torch.Tensor) -> int:
        """Number of updates ``param`` has received."""
        return int(self._state(param)["step"])

    def set_step_count(self, param: torch.Tensor, count: int) -> None:
        """Number ``param``'s next update ``count + 1``, however many updates it has had.

        For a tensor whose bias correction follows the global step ``k`` rather than its own updates
        (PESO-LoRA-T's ``(U, V)`` step every ``K`` steps with ``1 - beta^k``, Algorithm 6 lines 10-11):
        call with ``k - 1`` before the update. A ``beta2`` warm-up counts in the same numbers. The
        count is ordinary state, so ``state_dict`` and checkpoints carry it.
        """
        self._state(param)["step"] = torch.tensor(float(count))

    def reset_state(self, param: torch.Tensor) -> None:
        """Forget ``param``'s moments, step count and ``beta2`` schedule (a fresh start)."""
        self.state.pop(param, None)

    def set_beta2_warmup(
        self, param: torch.Tensor, window: int, beta2_min: float, *, tracked: bool = False
    ) -> None:
        """Start a ``beta2`` cosine warm-up from ``beta2_min`` at ``param``'s next update.

        ``tracked``: from now on ``param``'s second-moment bias correction is the weight its EMA
        actually has, ``w <- beta2(t) w + (1 - beta2(t))`` (``1 - prod beta2(t)``), starting from
        ``1 - beta2_final^t``; without it the correction stays ``1 - beta2_final^t`` (Algorithm 5).
        The two agree while ``beta2`` is constant.
        """
        state = self._state(param)
        state["beta2_start"] = int(state["step"]) + 1
        state["beta2_window"] = int(window)
        state["beta2_min"] = float(beta2_min)
        if tracked and "v_weight" not in state:
            state["v_weight"] = 1.0 - self._group(param)["betas"][1] ** int(state["step"])

    def bias_corrections(self, param: torch.Tensor) -> tuple[float, float]:
        """``(1 - beta1^t, second-moment correction)`` of ``param``'s last update ``t`` (see above).

        ``exp_avg / c1`` and ``exp_avg_sq / c2`` are the moments its next update builds on.
        """
        state = self._state(param)
        beta1, beta2_final = self._group(param)["betas"]
        update = int(state["step"])
        return 1.0 - beta1**update, float(state.get("v_weight", 1.0 - beta2_final**update))

    def _group(self, param: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    def beta2_at(self, param: torch.Tensor, update: int) -> float:
        """The ``beta2`` that ``param``'s update number ``update`` (1-based) uses."""
        return self._beta2(self._state(param), self._group(param)["betas"][1], update)

    @staticmethod
    def _beta2(state: dict, beta2_final: float, update: int) -> float:
        start = state.get("beta2_start")
        if start is None or update < start:
            return beta2_final
        return cosine_ramp(state["beta2_min"], beta2_final, update - start, state["beta2_window"])

    # ---- the update -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2_final), eps, wd = (
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self._state(param)
                state["step"] += 1
                update = int(state["step"])
                beta2 = self._beta2(state, beta2_final, update)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                param.mul_(1.0 - lr * wd)
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1**update
                if "v_weight" in state:  # tracked: the weight the EMA really has (set_beta2_warmup)
                    state["v_weight"] = beta2 * state["v_weight"] + (1.0 - beta2)
                    bias_correction2_sqrt = math.sqrt(state["v_weight"])
                else:
                    bias_correction2_sqrt = math.sqrt(1.0 - beta2_final**update)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss
