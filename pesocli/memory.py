"""Peak tensor memory of one piece of training work (a step, a restart), on CPU or CUDA.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, as everywhere.

CPU has no allocator statistics, and neither ``tracemalloc`` (blind to torch's allocator) nor
the process RSS (allocator caching, shared libraries, a peak that never goes down) can tell a
2% difference on a tiny model. So :func:`measure_peak` runs the work under ``torch.profiler``
with ``profile_memory=True``, which records every allocation and free of torch's CPU allocator
with its size and time: the running sum of those events is the tensor memory allocated by the
work and still alive at each moment, and its maximum is the work's own peak. The tensors alive
before the work (weights, quantisation statistics, anchors, adapters, their gradients and the
optimizer state) are counted by :func:`training_state_bytes` and added, so the figure is the
CPU counterpart of ``max_memory_allocated``: the peak of live tensor bytes. Allocations outside
torch (Python objects, numpy) are not counted; nothing in a step makes large ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Peak:
    """One measurement."""

    baseline_bytes: int
    """Live training-state tensor bytes when the work started."""
    extra_bytes: int
    """Highest tensor memory allocated by the work itself and alive at one moment."""
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.extra_bytes


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr(), storage.nbytes())


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterable[torch.Tensor]:
    for param in model.parameters():
        yield param
        if param.grad is not None:
            yield param.grad
        state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit statistics
        while state is not None:
            parts = (state.absmax, state.code, getattr(state, "offset", None))
            yield from (t for t in parts if t is not None)
            state = getattr(state, "state2", None)
        if getattr(param, "SCB", None) is not None:
            yield param.SCB
    for module in model.modules():
        scb = getattr(getattr(module, "state", None), "SCB", None)  # bitsandbytes int8 after a forward
        if isinstance(scb, torch.Tensor):
            yield scb
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages behind ``model``'s tensors, gradients and ``optimizer`` state."""
    seen = {}
    for tensor in _tensors(model, optimizer):
        key = _storage_key(tensor)
        if key is not None:
            seen[key] = key[2]
    return sum(seen.values())


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_peak(work: Callable[[], Any], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 device: torch.device | str = "cpu") -> Peak:
    """Run ``work()`` once and return its peak of live tensor memory (see the module docstring)."""
    import time

    device = torch.device(device)
    baseline = training_state_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated(device) - before
        return Peak(baseline_bytes=before, extra_bytes=extra, seconds=seconds)

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto prints a line at start and at stop
        prof.start()
    start = time.perf_counter()
    try:
        work()
    finally:
        seconds = time.perf_counter() - start
        with _native_stderr_silenced():
            prof.stop()
    events = sorted(  # stable: events with the same time stamp keep the order they were recorded in
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda event: event[0],
    )
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    return Peak(baseline_bytes=baseline, extra_bytes=highest, seconds=seconds)


@dataclass(kw_only=True)
class ProbeSetup:
    """What :func:`restart_memory_probe` trains: the tiny model, one method, a fixed batch."""

    method: str = "peso-r"
    quant: str = "none"
    gradient_checkpointing: bool = False
    fullgrad_mode: str = "sketch"
    batch_size: int = 16
    """Sequences per micro-batch (the embedded tiny config's 16)."""
    seq_len: int = 128
    """Tokens per sequence (the embedded tiny config's ``max_length``)."""
    rank: int = 8
    seed: int = 0


def restart_memory_probe(setup: ProbeSetup) -> dict[str, Any]:
    """Peak of ordinary training steps and of a (non-first) restart of the tiny model, on CPU.

    Trains as ``pesocli.train.loop`` does (restart before step 0, steps, restart before step 3 with
    ``K = 3``); measures steps 1 and 2, the restart before step 3, and step 3 (the one after a
    restart, with the moment rescaling). Returns the figures and ``ratio = restart / step`` peaks.
    """
    from pesocli.config import ModelConfig
    from pesocli.engine import Engine
    from pesocli.fullgrad import FullGradConfig
    from pesocli.methods import METHODS
    from pesocli.models import load_model_and_tokenizer, prepare_model
    from pesocli.optim import PesoAdamW

    model_cfg = ModelConfig(quant=setup.quant, gradient_checkpointing=setup.gradient_checkpointing)
    torch.manual_seed(setup.seed)
    model, tokenizer = load_model_and_tokenizer(model_cfg, "cpu")
    prepare_model(model, model_cfg)
    cls = METHODS[setup.method]
    options = {"rank": setup.rank, "alpha": 2.0 * setup.rank}
    if "restart_every" in cls.Config.field_names():
        options["restart_every"] = 3
    method = cls(cls.Config(**options))
    method.setup(total_steps=6, steps_per_epoch=6)
    engine = Engine(model, method, FullGradConfig(mode=setup.fullgrad_mode))
    model.train()
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(setup.seed)
    batch = torch.randint(0, len(tokenizer), (setup.batch_size, setup.seq_len), generator=generator)

    def loss() -> torch.Tensor:
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    def restart_pass() -> None:
        loss().backward()

    def restart(step: int) -> None:
        engine.maybe_restart(step, optimizer, restart_pass)

    def train_step(step: int) -> None:
        engine.step(optimizer, step, restart_pass, max_grad_norm=1.0)

    restart(0)
    train_step(0)  # creates the optimizer state: from here on the training state is steady
    steps = [measure_peak(lambda s=s: train_step(s), model, optimizer) for s in (1, 2)]
    restart_peak = measure_peak(lambda: restart(3), model, optimizer)
    after = measure_peak(lambda: train_step(3), model, optimizer)
    step_peak = max(p.peak_bytes for p in (*steps, after))
    return {
        "method": setup.method,
        "quant": setup.quant,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "fullgrad_mode": setup.fullgrad_mode,
        "tokens_per_step": setup.batch_size * setup.seq_len,
        "state_bytes": restart_peak.baseline_bytes,
        "step_peak_bytes": step_peak,
        "restart_peak_bytes": restart_peak.peak_bytes,
        "step_after_restart_peak_bytes": after.peak_bytes,
        "ratio": restart_peak.peak_bytes / step_peak,
        "step_seconds": min(p.seconds for p in steps),
        "restart_seconds": restart_peak.seconds,
    }
