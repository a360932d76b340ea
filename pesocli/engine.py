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

from pesocli.fullgrad import FullGradConfig, GradientEstimate, StepSketch, estimate_full_gradients
from pesocli.layers import AdaptedLinear, GradientProbe, inject_adapters
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
        self._pending: tuple[int, dict[str, GradientEstimate]] | None = None
        """``(step, estimates)``: the full gradient a training step sketched for the restart at ``step``."""

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
        pending, self._pending = self._pending, None
        if self.method.needs_full_gradient:
            if pending is not None and pending[0] == step:
                gradients = pending[1]  # fullgrad.source: previous-step
            else:
                gradients = estimate_full_gradients(
                    self.layers, run_pass, self.method.sketch_rank(), self.fullgrad
                )
        records = self.method.restart(
            RestartContext(step=step, layers=self.layers, optimizer=optimizer, gradients=gradients)
        )
        self.last_restart_seconds = time.perf_counter() - start
        return records

    @contextlib.contextmanager
    def training_step(self, step: int | None = None) -> Iterator[None]:
        """Wrap the micro-batches of optimizer step ``step``: attaches the method's step probes, if any.

        With ``fullgrad.source: previous-step`` and a restart due before step ``step + 1``, it also
        sketches this step's full gradient for that restart (:class:`~pesocli.fullgrad.StepSketch`).
        """
        sketch = None
        c = self.fullgrad
        if (
            step is not None
            and c.source == "previous-step"
            and self.method.needs_full_gradient
            and self.method.restart_due(step + 1)
        ):
            sketch = StepSketch(self.layers, self.method.sketch_rank(), c)
        attached = []
        for name, layer in self.layers.items():
            probes = [self.method.step_probe(name, layer), sketch.probes.get(name) if sketch else None]
            probes = [p for p in probes if p is not None]
            if probes:
                layer.probe = probes[0] if len(probes) == 1 else _BothProbes(*probes)
                attached.append(layer)
        try:
            yield
        finally:
            for layer in attached:
                layer.probe = None
        if sketch is not None:
            estimates = sketch.estimates()
            self._pending = (step + 1, estimates) if estimates is not None else None

    def before_step(self, optimizer: PesoAdamW, step: int) -> None:
        self.method.before_step(self.layers, optimizer, step)


class _BothProbes:
    """Hands a layer's ``(x, grad_out)`` to two probes (a method's step probe and a step sketch)."""

    def __init__(self, first: GradientProbe, second: GradientProbe) -> None:
        self.first, self.second = first, second

    def observe(self, x, grad_out) -> None:  # noqa: ANN001
        self.first.observe(x, grad_out)
        self.second.observe(x, grad_out)
