"""Benchmark worker processes: one method alone (timings + peak memory), or every method interleaved."""

from __future__ import annotations

import argparse
import sys

from benchlib.meter import MemoryMeter
from benchlib.models import build_model, random_batches
from benchlib.side import PEFT, Side, parse_spec


def run_worker(args: argparse.Namespace) -> dict:
    """One method in this process: timings, and peak memory above the state before the adapters."""
    import torch

    from pesocli.models import resolve_dtype

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, vocab = build_model(args.model, device, dtype)
    model.train()
    data = random_batches(args, vocab, device)
    if parse_spec(args.worker)[0] == PEFT:
        import peft  # noqa: F401 - imported before the baseline: not the method's memory
    meter = MemoryMeter(device)
    meter.start()
    weights_bytes = 0
    if args.tensor_memory:
        from pesocli.memory import training_state_bytes

        weights_bytes = training_state_bytes(model)
    side = Side(args, args.worker, model, device)
    setup_bytes = meter.peak()  # adapters (and anything their setup allocated), before any step
    profile_from = args.profile_from if args.profile_from is not None else args.warmup
    profiler = None

    def one_step(step: int) -> None:
        nonlocal profiler
        if args.profile and step == profile_from:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            profiler = profile(activities=activities)
            profiler.__enter__()
        side.step(step, data[step])
        if profiler is not None and step == profile_from + args.profile - 1:
            profiler.__exit__(None, None, None)
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
            print(f"profile of steps {profile_from}..{step} ({side.name}):\n{table}", file=sys.stderr)
            profiler = None

    # --tensor-memory: the steps from K - 2 on run one by one under pesocli.memory.measure_peak
    # (torch.profiler allocator events: live tensor bytes); their timings are not used.
    window = max(0, args.restart_every - 2) if args.tensor_memory else args.steps
    tensor_peaks = []
    for step in range(args.steps):
        if step >= window:
            from pesocli.memory import measure_peak

            peak_of = measure_peak(lambda s=step: one_step(s), side.model, side.optimizer, device)
            tensor_peaks.append(peak_of.peak_bytes)
        else:
            one_step(step)
    return {
        **side.result(args),
        "peak_bytes": meter.peak(),
        "peak_rss_bytes": meter.peak_rss(),
        "setup_bytes": setup_bytes,
        "tensor_peak_bytes": max(tensor_peaks) if tensor_peaks else None,
        "tensor_peaks_from_step": [window, tensor_peaks],
        "weights_bytes": weights_bytes,
        "baseline_bytes": meter.base,
        "memory_how": meter.how,
        "dtype": str(dtype),
    }


def run_interleaved_worker(args: argparse.Namespace, specs: list[str], first: int) -> dict[str, dict]:
    """Every spec in this one process, each on its own copy of the model, their steps interleaved.

    Step ``s`` of every method runs before step ``s + 1`` of any, in an order that rotates every
    step (starting at ``first``), so slow phases of a shared machine and the process's own memory
    layout fall on all methods alike: the ratios are far steadier than between processes
    (``lora`` against itself moved 10% between processes on the 2-core VM). No memory figures.
    """
    import torch

    from pesocli.models import resolve_dtype

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sides = []
    vocab = 0
    for spec in specs:
        torch.manual_seed(args.seed)
        model, vocab = build_model(args.model, device, dtype)
        model.train()
        sides.append(Side(args, spec, model, device))
    data = random_batches(args, vocab, device)
    for step in range(args.steps):
        at = (first + step) % len(sides)
        for side in sides[at:] + sides[:at]:
            side.step(step, data[step])
    zero = {"peak_bytes": 0, "peak_rss_bytes": 0, "setup_bytes": 0, "dtype": str(dtype)}
    return {side.spec: {**side.result(args), **zero} for side in sides}
