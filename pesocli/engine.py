"""The glue between a model, a method and the full-gradient estimator (Algorithm 1's outer loop).

The trainer (and the Appendix A script) call :meth:`Engine.maybe_restart` before each optimizer
step and :meth:`Engine.before_step` between backward and ``optimizer.step()``; they never look
inside the method.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from torch import nn

from pesocli.fullgrad import FullGradConfig, estimate_full_gradients
from pesocli.layers import AdaptedLinear, inject_adapters
from pesocli.methods.base import Method, RestartContext, RestartRecord
from pesocli.optim import PesoAdamW


class Engine:
    """Adapts ``model`` for ``method`` and runs its restarts."""

    def __init__(self, model: nn.Module, method: Method, fullgrad: FullGradConfig | None = None) -> None:
        self.model = model
        self.method = method
        self.fullgrad = fullgrad or FullGradConfig()
        c = method.config
        self.layers: dict[str, AdaptedLinear] = inject_adapters(
            model,
            tuple(c.target_modules),
            method.build_delta,
            anchor_mode=c.anchor_mode,
            anchor_rank_cap=c.anchor_rank_cap,
        )
        self.last_restart_seconds = 0.0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.delta.parameters()]

    def maybe_restart(
        self, step: int, optimizer: PesoAdamW, run_pass: Callable[[], None]
    ) -> list[RestartRecord]:
        """Run the method's restart when one is due before ``step``; returns its records.

        ``run_pass()`` runs forward + backward over the restart micro-batches; it is called
        only when the method needs a full-gradient estimate.
        """
        if not self.method.restart_due(step):
            return []
        start = time.perf_counter()
        gradients = None
        if self.method.needs_full_gradient:
            gradients = estimate_full_gradients(
                self.layers, run_pass, self.method.sketch_rank(), self.fullgrad
            )
        records = self.method.restart(
            RestartContext(step=step, layers=self.layers, optimizer=optimizer, gradients=gradients)
        )
        self.last_restart_seconds = time.perf_counter() - start
        return records

    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """Wrap the micro-batches of one optimizer step: attaches the method's step probes, if any."""
        attached = []
        for name, layer in self.layers.items():
            probe = self.method.step_probe(name, layer)
            if probe is not None:
                layer.probe = probe
                attached.append(layer)
        try:
            yield
        finally:
            for layer in attached:
                layer.probe = None

    def before_step(self, optimizer: PesoAdamW, step: int) -> None:
        self.method.before_step(self.layers, optimizer, step)
