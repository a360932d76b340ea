"""What keeps a run from going bad silently: the loss watchdog, restart snapshots and stop signals.

- :class:`Watchdog` judges each step after backward and before the optimizer touches anything: a
  non-finite loss, non-finite gradients, or (``train.loss_spike_factor``) a loss above ``factor``
  times the median of the last :data:`SPIKE_WINDOW` accepted losses. ``train.nan_policy`` says
  whether such a step stops the run or is skipped; its state is part of every checkpoint.
- :class:`Snapshot` holds what a restart may change (each layer's delta, anchor and optimizer
  state, and the method's JSON state) so a restart that produces non-finite numbers in a layer can
  keep that layer's old subspace, and a run that must stop at a restart step can go back to the
  last good state exactly. Low-rank anchors are held by reference: ``LowRankAnchor.absorb`` and
  ``compress`` replace the pair instead of editing it. Dense anchors are edited in place and would
  need a full copy, so they are not held (``Snapshot.exact`` is then ``False``).
- :class:`StopSignals`: SIGINT/SIGTERM set a flag the loop reads after each step (finish the step,
  write a full checkpoint, exit 130/143); a second signal aborts at once.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pesocli.config import TrainConfig
from pesocli.layers import AdaptedLinear
from pesocli.methods.base import Method
from pesocli.optim import PesoAdamW

SPIKE_WINDOW = 20
"""Accepted step losses the spike watchdog takes its median over."""

SPIKE_MIN_HISTORY = 5
"""Accepted steps needed before the spike watchdog judges anything."""


def _nonfinite(groups: dict[str, list[torch.Tensor]]) -> list[str]:
    """Keys of ``groups`` (in order) with a NaN or an infinity in one of their tensors (one sync)."""
    names, peaks = [], []
    for name, tensors in groups.items():
        for tensor in tensors:
            if tensor.numel():
                names.append(name)
                peaks.append(tensor.detach().abs().amax().float())
    if not peaks:
        return []
    device = peaks[0].device
    finite = torch.isfinite(torch.stack([p.to(device) for p in peaks])).tolist()
    bad = {name for name, ok in zip(names, finite, strict=True) if not ok}
    return [name for name in groups if name in bad]


def nonfinite_grad_layers(layers: dict[str, AdaptedLinear]) -> list[str]:
    """Names of the layers (in model order) whose delta gradients hold a NaN or an infinity."""
    grads = {name: [p.grad for p in layer.delta.parameters()] for name, layer in layers.items()}
    return _nonfinite({name: [g for g in gs if g is not None] for name, gs in grads.items()})


def _layer_tensors(layer: AdaptedLinear, optimizer: PesoAdamW) -> list[torch.Tensor]:
    tensors = [t for t in layer.delta.state_dict().values() if t.is_floating_point()]
    anchor = layer.anchor
    tensors += anchor.check_tensors()
    for param in layer.delta.parameters():
        state = optimizer.state.get(param) or {}
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return tensors


def nonfinite_layers(layers: dict[str, AdaptedLinear], optimizer: PesoAdamW) -> list[str]:
    """Layers whose delta, anchor or optimizer state holds a NaN or an infinity."""
    return _nonfinite({name: _layer_tensors(layer, optimizer) for name, layer in layers.items()})


class Watchdog:
    """Decides whether a step may update the model (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.policy = cfg.nan_policy
        self.factor = cfg.loss_spike_factor
        self.max_consecutive = cfg.max_consecutive_skips
        self.recent: list[float] = []
        self.consecutive = 0
        self.skipped = 0

    def verdict(self, loss: float, layers: dict[str, AdaptedLinear]) -> str | None:
        """Why this step must not update the model, or ``None`` when it may."""
        if not math.isfinite(loss):
            bad = nonfinite_grad_layers(layers)
            where = f"; non-finite gradients in {len(bad)} of {len(layers)} layers, first {bad[0]}"
            return f"non-finite loss ({loss}){where if bad else ''}"
        bad = nonfinite_grad_layers(layers)
        if bad:
            return f"non-finite gradients in {len(bad)} of {len(layers)} layers, first {bad[0]}"
        if self.factor is not None and len(self.recent) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.recent)
            if loss > self.factor * median:
                return (
                    f"loss spike: {loss:.4g} > {self.factor:g} x {median:.4g} "
                    f"(median of the last {len(self.recent)} steps)"
                )
        return None

    def accept(self, loss: float) -> None:
        self.recent = [*self.recent, loss][-SPIKE_WINDOW:]
        self.consecutive = 0

    def reject(self) -> bool:
        """Count a bad step; ``True`` when the run must stop (policy ``stop``, or too many in a row)."""
        self.consecutive += 1
        self.skipped += 1
        return self.policy == "stop" or self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state["recent"]]
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])


# ------------------------------------------------------------------------------------ snapshots


@dataclass
class _LayerSnapshot:
    delta: dict[str, torch.Tensor]
    anchor: tuple[torch.Tensor, torch.Tensor] | None
    anchor_is_zero: bool
    optim: dict[str, dict[str, Any] | None]


@dataclass
class Snapshot:
    """What a restart may change, taken just before it (see the module docstring)."""

    layers: dict[str, _LayerSnapshot] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    """``False`` when a dense anchor could not be held: such a layer cannot be rolled back."""

    @classmethod
    @torch.no_grad()
    def take(cls, layers: dict[str, AdaptedLinear], optimizer: PesoAdamW, method: Method) -> Snapshot:
        snap = cls(method_state=method.state_dict())
        for name, layer in layers.items():
            anchor = (layer.anchor.up, layer.anchor.down) if layer.anchor.restorable else None
            snap.exact &= anchor is not None
            snap.layers[name] = _LayerSnapshot(
                delta={k: v.detach().clone() for k, v in layer.delta.state_dict().items()},
                anchor=anchor,
                anchor_is_zero=layer.anchor.is_zero,
                optim={
                    pname: _clone_state(optimizer.state.get(p)) for pname, p in layer.delta.named_parameters()
                },
            )
        return snap

    def can_restore(self, name: str) -> bool:
        return self.layers[name].anchor is not None

    @torch.no_grad()
    def restore_layer(self, name: str, layer: AdaptedLinear, optimizer: PesoAdamW) -> None:
        """Put one layer's delta, anchor and optimizer state back as they were."""
        snap = self.layers[name]
        for key, value in snap.delta.items():
            _assign(layer.delta, key, value.clone())
        if snap.anchor is not None:
            layer.anchor.up, layer.anchor.down = snap.anchor
        layer.anchor.is_zero = snap.anchor_is_zero
        for pname, param in layer.delta.named_parameters():
            state = snap.optim[pname]
            if state is None:
                optimizer.state.pop(param, None)
            else:
                optimizer.state[param] = _clone_state(state)

    def restore(self, layers: dict[str, AdaptedLinear], optimizer: PesoAdamW, method: Method) -> None:
        """Undo the whole restart (every layer and the method state)."""
        for name, layer in layers.items():
            self.restore_layer(name, layer, optimizer)
        method.load_state_dict(self.method_state)


def _clone_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if not state:
        return None
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _assign(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``key`` of ``module`` (a parameter keeps its identity for the optimizer)."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        param = owner._parameters[leaf]
        if param.shape == value.shape:
            param.copy_(value)
        else:
            param.data = value
    else:
        owner._buffers[leaf] = value


# -------------------------------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGINT/SIGTERM only set :attr:`signum`; a second one raises ``KeyboardInterrupt``.

    Installs nothing outside the main thread (signal handlers can only live there).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        message = (
            f"received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            "(send it again to stop at once)\n"
        )
        try:  # os.write, not print: a handler may run while Python is inside a write to stderr
            if sys.stderr.isatty():  # a line of its own, not glued after the progress bar's text
                message = "\n" + message
            os.write(sys.stderr.fileno(), message.encode())
        except (OSError, ValueError, AttributeError):
            pass

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
