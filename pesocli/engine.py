"""The glue between a model, a method and the full-gradient estimator (Algorithm 1's outer loop).

The trainer calls :meth:`Engine.maybe_restart` before each optimizer step, runs forward + backward
inside :meth:`Engine.training_step` and updates with :meth:`Engine.update` (the method's hooks around
gradient clipping, then ``optimizer.step()``), once per group of :meth:`Engine.phases`; it never
looks inside the method. Scripts and tests without processes or a watchdog take the whole step from
:meth:`Engine.step`, so no copy of the step order can drift from the trainer's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn

from pesocli.fullgrad import FullGradConfig, GradientEstimate, StepSketch, estimate_full_gradients
from pesocli.layers import ANCHOR_DTYPES, AdaptedLinear, GradientProbe, inject_adapters
from pesocli.methods.base import Method, RestartContext, RestartRecord
from pesocli.optim import PesoAdamW

T = TypeVar("T")


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
            anchor_max_rank=c.anchor_max_rank,
            anchor_keep_energy=c.anchor_keep_energy,
            anchor_dtype=ANCHOR_DTYPES[c.anchor_dtype],
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
        for record in records:  # what a lossy anchor dropped in this event (method-independent)
            layer = self.layers.get(record.layer)
            if layer is not None and layer.anchor.lossy:
                record.anchor_dropped_energy = layer.anchor.take_dropped_energy()
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

    def phases(self, step: int) -> list[list[nn.Parameter]]:
        """The parameter groups step ``step`` updates one after the other, each on gradients of its own pass.

        ``[all trainable]``, or ``[first, rest]`` when the method splits the step
        (:meth:`~pesocli.methods.base.Method.first_phase`): ``rest`` steps on the gradients of a second
        forward + backward taken after ``first`` stepped.
        """
        params = self.trainable_parameters()
        first = self.method.first_phase(self.layers, step)
        if first is None:
            return [params]
        chosen = {id(p) for p in first}
        return [[p for p in params if id(p) in chosen], [p for p in params if id(p) not in chosen]]

    def update(
        self,
        optimizer: PesoAdamW,
        step: int,
        max_grad_norm: float = 0.0,
        params: Sequence[nn.Parameter] | None = None,
    ) -> torch.Tensor | None:
        """One optimizer update of ``params`` (default: all trainable) from their ``.grad``.

        Drops the other trainable parameters' gradients, then: the method's ``before_step`` (which
        gradients are used) -> clip to ``max_grad_norm`` (when > 0) -> the method's ``before_update``
        (reads exactly what AdamW will use) -> ``optimizer.step()``. Returns the norm of the used
        gradients before clipping (``None`` without clipping).
        """
        if params is not None:
            chosen = {id(p) for p in params}
            for param in self.trainable_parameters():
                if id(param) not in chosen:
                    param.grad = None
        self.method.before_step(self.layers, optimizer, step)
        norm = None
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_grad_norm)
        self.method.before_update(self.layers, optimizer, step)
        optimizer.step()
        return norm

    def step(
        self, optimizer: PesoAdamW, step: int, gradient_pass: Callable[[], T], max_grad_norm: float = 0.0
    ) -> T:
        """Optimizer step ``step`` in ``peso train``'s order, for a loop without processes or a watchdog.

        ``gradient_pass()`` runs forward + backward of the step's batch (and returns its loss). It runs
        inside :meth:`training_step`, then :meth:`update`; on a two-phase step it runs again (drawing
        the same dropout masks) for the second group. Gradients are zeroed before every pass and at
        the end. Restarts are the caller's (:meth:`maybe_restart`). Returns what the first pass returned.
        """
        phases = self.phases(step)
        rng = RngReplay() if len(phases) > 1 else None
        optimizer.zero_grad(set_to_none=True)
        with self.training_step(step):
            loss = gradient_pass()
        self.update(optimizer, step, max_grad_norm, phases[0])
        for params in phases[1:]:
            optimizer.zero_grad(set_to_none=True)
            with rng.replay():
                gradient_pass()
            self.update(optimizer, step, max_grad_norm, params)
        optimizer.zero_grad(set_to_none=True)
        return loss


class RngReplay:
    """The torch RNG (CPU and current CUDA device) as it is at construction, to run a block from again.

    ``with replay():`` runs the block from that state and leaves the RNG where it found it: the second
    pass of a two-phase step draws the first pass's dropout masks (the same stochastic gradient), and
    the run's RNG stream is that of a one-pass step.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state() if cuda else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


class _BothProbes:
    """Hands a layer's ``(x, grad_out)`` to two probes (a method's step probe and a step sketch)."""

    def __init__(self, first: GradientProbe, second: GradientProbe) -> None:
        self.first, self.second = first, second

    def observe(self, x, grad_out) -> None:  # noqa: ANN001
        self.first.observe(x, grad_out)
        self.second.observe(x, grad_out)
