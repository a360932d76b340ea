"""Step time, restart cost and peak memory of every registered method against ``lora`` and PEFT's LoRA.

Every method trains the same model (``--model tiny``: the built-in tiny Llama; ``--model 100m``: a
random-weight ~100M-parameter Llama built from ``LlamaConfig``) on the same random-token batches
(``--batch`` x ``--seq``) with the same step order as ``peso train`` (``pesocli/train/loop.py``):

    maybe_restart -> Engine.step -> schedule -> zero_grad

(``Engine.step``: forward + backward in ``training_step`` -> before_step -> clip -> before_update ->
step, and for a method that splits the step, such as peso-t's sequential order, a second forward +
backward and the second group's update)

built from the same blocks (``Engine``, ``PesoAdamW``, ``build_scheduler``) but in a loop of its own, so
the figures measure the method and not the CLI (no logging, no progress bar, no checkpoints).
``peft-lora`` is the outside baseline: ``peft.get_peft_model`` (r, alpha, targets as ours) and the same
loop with ``torch.optim.AdamW``.

Timing (``--timing``): ``interleaved`` (default on CPU) runs every method in one process per repeat,
each on its own copy of the model, step ``s`` of every method before step ``s + 1`` of any, in an order
that rotates every step; ``processes`` (default on CUDA, where peak memory needs a process per method)
runs each (method, repeat) in its own subprocess, the method order rotating every repeat. Between
processes the same method's step time moved by up to 10% on the 2-core VM (memory layout, load from
other users), which swamps 2% targets; interleaved in one process ``lora`` against PEFT's LoRA stays
within 0.5%.

Measured per run (times on two clocks: ``perf_counter`` wall time and ``process_time`` CPU time;
``--clock auto`` reports CPU time on CPU, where other users of a shared machine stretch wall time
but hardly the CPU time of a one-thread process, and wall time on CUDA, synchronised):
- step time: the training step proper (forward, backward, method hook, clip, optimizer, schedule)
  at every step; ``median_step_s`` is its median after ``--warmup`` steps.
- restarts: ``Engine.maybe_restart`` (sketch passes + SVD + alignment), split by wall-time share
  into the sketch (everything but the methods' per-layer work) and SVD + alignment (the
  per-layer ``RestartRecord.seconds``). ``restart_share`` = restart time / total training time.
- ``amortised_step_s`` = ``median_step_s`` + total restart time / steps: the time per step of a
  run with restarts, robust to the odd slow step. The target ratios use it. ``late_vs_early``:
  median step time after the second restart over the median before it, in the same process
  (what an anchor costs per step, free of between-process noise).
- peak memory, restart steps included, above a baseline taken after the model and the batches
  are built and before adapters exist. Primary figure (CPU, on by default): one more, untimed run
  per method in which the steps from ``K - 2`` to ``K + 2`` (a restart included) run under
  ``pesocli.memory.measure_peak``: peak live tensor bytes from torch's allocator events (the CPU
  counterpart of ``max_memory_allocated``), minus the model's weights. With ``--timing processes``
  also: peak anonymous resident memory of the timed runs (``VmHWM`` reset through
  ``/proc/self/clear_refs``, minus file-backed pages; see :class:`MemoryMeter`), which includes
  glibc's caching of freed blocks and what adapter setup allocates outside torch (``setup_bytes``:
  PEFT's module wrappers). CUDA: ``torch.cuda.max_memory_allocated`` in the timed runs.

    OMP_NUM_THREADS=1 python scripts/bench_methods.py --model tiny --steps 200 --repeats 3 \\
        --extra peso-r:fullgrad.single_pass=false --json docs/figures/bench_methods_tiny.json \\
        --plot docs/figures/bench_methods_tiny.png

A method may carry config overrides: ``peso-r:fullgrad.power_iters=0`` (comma-separated
``key=value`` after the colon; a bare key is taken from the ``method`` section). Diagnostics:
``--worker METHOD --profile N --profile-from STEP`` prints a ``torch.profiler`` table of N steps
of one method; ``--layer-micro`` times one adapted layer with and without an anchor;
``--paired-peft`` alternates our ``lora`` and PEFT's in one process; ``--from-json FILE``
re-prints a saved run's tables (and ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import peak_anon_bytes, reset_peak, status_kib

PEFT = "peft-lora"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ~100M parameters: Llama-3-style GQA (12 query heads over 4 key/value heads), tied embeddings.
LLAMA_100M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
MODEL_DEFAULTS = {"tiny": {"batch": 16, "seq": 128}, "100m": {"batch": 2, "seq": 128}}


# ------------------------------------------------------------------------------------- memory


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator statistics, or the kernel's counters on CPU.

    CPU: ``VmHWM`` (peak resident set) is reset to the current RSS at :meth:`start`. It counts
    file-backed pages too, and a method that runs new code (a restart's LAPACK calls) faults in
    pages of ``libtorch_cpu.so`` that are not memory it allocated. So :meth:`peak` subtracts
    ``RssFile`` + ``RssShmem`` at the end: ``(VmHWM - file_end) - anon_start``, the peak of
    anonymous memory above the baseline (a slight under-estimate when code pages are first touched
    after the peak). With glibc's default allocator it includes freed blocks glibc keeps for
    reuse, so it is an upper bound on live memory. ``peak_rss`` keeps the uncorrected figure.
    """

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.base = 0
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM - RssFile - RssShmem"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            return
        reset_peak()
        self.base = status_kib("RssAnon") * 1024
        self.base_rss = status_kib("VmHWM") * 1024

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return peak_anon_bytes() - self.base

    def peak_rss(self) -> int:
        if self.cuda:
            return self.peak()
        return status_kib("VmHWM") * 1024 - self.base_rss


# ------------------------------------------------------------------------------------- worker


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``peso-r:fullgrad.power_iters=0,restart_every=100`` -> ``("peso-r", {...})``."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key if "." in key else f"method.{key}"] = value
    return name, overrides


def build_model(kind: str, device, dtype):
    import torch

    if kind == "tiny":
        from pesocli.models import build_tiny_model, load_tiny_tokenizer

        tokenizer = load_tiny_tokenizer()
        return build_tiny_model(tokenizer).to(device=device, dtype=dtype), len(tokenizer)
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_100M))
    return model.to(device=device, dtype=dtype), LLAMA_100M["vocab_size"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One method (``spec``) on its own model: its set-up and one timed optimizer step at a time."""

    def __init__(self, args: argparse.Namespace, spec: str, model, device) -> None:
        import torch

        from pesocli.config import load_config
        from pesocli.engine import Engine
        from pesocli.methods import build_method
        from pesocli.optim import PesoAdamW
        from pesocli.train.lr import build_scheduler

        self.spec, self.device = spec, device
        self.name, overrides = parse_spec(spec)
        torch.manual_seed(args.seed)
        self.engine = None
        if self.name == PEFT:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGETS)
                ),
            )
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(
                self.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
            )
            self.config = {"peft": {"r": args.rank, "lora_alpha": args.alpha}}
            self.max_grad_norm = 1.0
        else:
            base = {
                "method.name": self.name,
                "method.rank": args.rank,
                "method.alpha": args.alpha,
                "optim.lr": args.lr,
            }
            cfg = load_config(None, base)
            if "restart_every" in type(cfg.method).field_names():
                base["method.restart_every"] = args.restart_every
            cfg = load_config(None, {**base, **overrides})
            method = build_method(cfg.method, self.name)
            method.setup(total_steps=args.steps, steps_per_epoch=args.steps)
            self.engine = Engine(model, method, cfg.fullgrad)
            self.params = self.engine.trainable_parameters()
            o = cfg.optim
            self.optimizer = PesoAdamW(
                self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
            )
            self.config = {"method": cfg.method.__dict__, "fullgrad": cfg.fullgrad.__dict__}
            self.max_grad_norm = o.max_grad_norm
        self.model = model
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=args.steps, warmup_ratio=0.03, kind="cosine",
            multiplier=self.engine.method.lr_multiplier if self.engine is not None else None,
        )
        self.series: dict[str, list[float]] = {
            k: [] for k in ("step_s", "restart_s", "step_cpu_s", "restart_cpu_s", "align_s", "losses")
        }
        self.restart_steps: list[int] = []

    def loss_of(self, ids):
        return self.model(input_ids=ids, labels=ids).loss

    def gradient_pass(self, ids):
        """Forward + backward; the loss, detached (read after the step: no sync inside it)."""
        loss = self.loss_of(ids)
        loss.backward()
        return loss.detach()

    def step(self, step: int, ids) -> None:
        """One optimizer step in ``peso train``'s order, timed (restart and training step apart)."""
        import torch

        engine, device, series = self.engine, self.device, self.series
        seconds_restart = seconds_align = cpu_restart = 0.0
        if engine is not None:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()

            def restart_pass(ids_=ids) -> None:
                self.loss_of(ids_).backward()

            with torch.profiler.record_function("bench::restart"):
                records = engine.maybe_restart(step, self.optimizer, restart_pass)
            _sync(device)
            if records:
                seconds_restart = time.perf_counter() - start
                cpu_restart = time.process_time() - cpu_start
                seconds_align = sum(r.seconds for r in records)
                self.restart_steps.append(step)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.profiler.record_function("bench::train_step"):
            if engine is not None:
                loss = engine.step(self.optimizer, step, lambda: self.gradient_pass(ids), self.max_grad_norm)
            else:
                loss = self.gradient_pass(ids)
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        series["losses"].append(float(loss.detach()))
        _sync(device)
        series["step_s"].append(time.perf_counter() - start)
        series["step_cpu_s"].append(time.process_time() - cpu_start)
        series["restart_s"].append(seconds_restart)
        series["restart_cpu_s"].append(cpu_restart)
        series["align_s"].append(seconds_align)

    def result(self, args: argparse.Namespace) -> dict:
        """Per-step timings and set-up facts, in the JSON form the driver aggregates."""
        import torch

        losses = self.series["losses"]
        layers = self.engine.layers.values() if self.engine else []
        return {
            "spec": self.spec,
            "method": self.name,
            "config": self.config,
            "model": args.model,
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.params),
            "batch": args.batch,
            "seq": args.seq,
            "steps": len(losses),
            **{k: v for k, v in self.series.items() if k != "losses"},
            "restart_steps": self.restart_steps,
            "anchor_ranks_end": sorted({layer.anchor.rank for layer in layers}),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "device": str(self.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg(),
        }


def _batches(args: argparse.Namespace, vocab: int, device) -> list:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    return [
        torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        for _ in range(args.steps)
    ]


def run_worker(args: argparse.Namespace) -> dict:
    """One method in this process: timings, and peak memory above the state before the adapters."""
    import torch

    from pesocli.models import resolve_dtype

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, vocab = build_model(args.model, device, dtype)
    model.train()
    data = _batches(args, vocab, device)
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
    data = _batches(args, vocab, device)
    for step in range(args.steps):
        at = (first + step) % len(sides)
        for side in sides[at:] + sides[:at]:
            side.step(step, data[step])
    zero = {"peak_bytes": 0, "peak_rss_bytes": 0, "setup_bytes": 0, "dtype": str(dtype)}
    return {side.spec: {**side.result(args), **zero} for side in sides}


# ------------------------------------------------------------------------------------- driver


def summarise_run(run: dict, warmup: int, clock: str = "wall") -> dict:
    """Per-run figures on one clock: ``wall`` (perf_counter) or ``cpu`` (process CPU time)."""
    suffix = "_cpu_s" if clock == "cpu" else "_s"
    steps = run["step" + suffix]
    restart = sum(run["restart" + suffix])
    wall_restart = sum(run["restart_s"])
    align_share = sum(run["align_s"]) / wall_restart if wall_restart > 0 else 0.0
    train = sum(steps)
    median = statistics.median(steps[warmup:] if len(steps) > warmup else steps)
    # median step time of each segment between restarts (anchor growth shows up here)
    bounds = [*run["restart_steps"], run["steps"]] if run["restart_steps"] else [0, run["steps"]]
    segments = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = steps[max(lo, warmup) : hi] or steps[lo:hi]
        if chunk:
            segments.append(statistics.median(chunk))
    return {
        "median_step_s": median,
        "mean_step_s": (train + restart) / run["steps"],
        "restart_total_s": restart,
        "restarts": len(run["restart_steps"]),
        "sketch_s": restart * (1 - align_share),
        "svd_align_s": restart * align_share,
        "restart_share": restart / (train + restart),
        "amortised_step_s": median + restart / run["steps"],
        "segment_median_s": segments,
        # in-process: step time after the second restart against before it (an anchor's cost shows here)
        "late_vs_early": statistics.median(segments[1:]) / segments[0] if len(segments) > 1 else 1.0,
        "peak_bytes": run["peak_bytes"],
        "setup_bytes": run.get("setup_bytes", 0),
    }


def aggregate(runs: list[dict]) -> dict:
    """Median over repeats of every per-run summary figure."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["repeats"] = len(runs)
    out["amortised_step_s_all"] = [r["amortised_step_s"] for r in runs]
    out["peak_bytes_all"] = [r["peak_bytes"] for r in runs]
    return out


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.3f}" if b else "-"


def print_table(results: dict[str, dict], wall: dict[str, dict] | None = None) -> str:
    """Ratios of amortised step time against ``lora`` and PEFT's LoRA, with the restart share."""
    lora = results.get("lora")
    peft = results.get(PEFT)
    wall = wall or {}
    head = (
        f"{'method':<34} {'median s':>9} {'amort. s':>9} {'spread':>7} {'x lora':>7} {'x peft':>7} "
        f"{'wall x lora':>11} {'restarts':>8} {'share':>6} {'late/early':>10}"
    )
    lines = [head, "-" * len(head)]
    for spec, r in results.items():
        w, wl = wall.get(spec), wall.get("lora")
        values = r["amortised_step_s_all"]
        spread = (max(values) - min(values)) / 2 / r["amortised_step_s"]
        lines.append(
            f"{spec:<34} {r['median_step_s']:>9.4f} {r['amortised_step_s']:>9.4f} {100 * spread:>6.1f}% "
            f"{_ratio(r['amortised_step_s'], lora and lora['amortised_step_s']):>7} "
            f"{_ratio(r['amortised_step_s'], peft and peft['amortised_step_s']):>7} "
            f"{_ratio(w['amortised_step_s'], wl['amortised_step_s']) if w and wl else '-':>11} "
            f"{r['restarts']:>8.0f} {100 * r['restart_share']:>5.1f}% {r['late_vs_early']:>10.3f}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def memory_figures(results: dict[str, dict], tensor_runs: dict[str, dict] | None) -> dict[str, float]:
    """The primary memory figure per method: live tensor bytes above the weights when measured
    (``--tensor-memory``), else the timing runs' peak (CUDA allocator, or anonymous RSS on CPU)."""
    if tensor_runs:
        return {k: t["tensor_peak_bytes"] - t["weights_bytes"] for k, t in tensor_runs.items()}
    return {k: r["peak_bytes"] for k, r in results.items()}


def print_memory_table(results: dict[str, dict], tensor_runs: dict[str, dict] | None) -> str:
    """Peak memory as ratios against ``lora`` and PEFT's LoRA: live tensor bytes (when measured)
    and the timing runs' own peak (anonymous RSS on CPU, which includes allocator caching and
    Python objects; ``max_memory_allocated`` on CUDA)."""

    def ratios(values: dict[str, float]) -> dict[str, tuple[str, str]]:
        lora, peft = values.get("lora"), values.get(PEFT)
        return {k: (_ratio(v, lora), _ratio(v, peft)) for k, v in values.items()}

    anon = {k: r["peak_bytes"] for k, r in results.items()}
    tensors = memory_figures(results, tensor_runs) if tensor_runs else {}
    ra, rt = ratios(anon), ratios(tensors)
    head = (
        f"{'method':<34} {'tensors MiB':>11} {'x lora':>7} {'x peft':>7}   "
        f"{'run peak MiB':>12} {'x lora':>7} {'x peft':>7} {'setup MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for spec, r in results.items():
        t = tensors.get(spec)
        tensor_cols = (
            f"{t / 2**20:>11.2f} {rt[spec][0]:>7} {rt[spec][1]:>7}" if t is not None else f"{'-':>27}"
        )
        run_cols = (
            f"{anon[spec] / 2**20:>12.2f} {ra[spec][0]:>7} {ra[spec][1]:>7} {r['setup_bytes'] / 2**20:>9.2f}"
            if any(anon.values())
            else f"{'-':>12} (not measured with --timing interleaved)"
        )
        lines.append(f"{spec:<34} {tensor_cols}   {run_cols}")
    text = "\n".join(lines)
    print()
    print(text)
    return text


def plot(
    results: dict[str, dict],
    runs: dict[str, list[dict]],
    path: str,
    title: str,
    clock: str,
    tensor_runs: dict[str, dict] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for spec, spec_runs in runs.items():
        key = "step_cpu_s" if clock == "cpu" else "step_s"
        steps = [statistics.median(col) for col in zip(*(r[key] for r in spec_runs), strict=True)]
        window = 9
        smooth = [
            statistics.median(steps[max(0, i - window // 2) : i + window // 2 + 1]) for i in range(len(steps))
        ]
        (line,) = left.plot(range(len(smooth)), [1000 * s for s in smooth], label=spec, lw=1.1)
        for step in spec_runs[0]["restart_steps"]:
            left.axvline(step, color=line.get_color(), ls=":", lw=0.8, alpha=0.6)
    left.set_xlabel("step")
    left.set_ylabel(f"training step, {clock} ms")
    left.set_title("step time: median of repeats, 9-step running median (dotted: restarts)", fontsize=9)
    left.legend(fontsize=6, ncol=2, loc="upper left", framealpha=0.6)
    names = list(results)
    memory = memory_figures(results, tensor_runs)
    lora = results.get("lora", {}).get("amortised_step_s")
    base = [results[n]["median_step_s"] / lora for n in names] if lora else []
    extra = (
        [(results[n]["amortised_step_s"] - results[n]["median_step_s"]) / lora for n in names] if lora else []
    )
    if lora:
        xs = range(len(names))
        right.bar(xs, base, label="training step")
        right.bar(xs, extra, bottom=base, label="restarts (amortised)")
        right.axhline(1.02, color="k", ls="--", lw=0.8, label="1.02 x lora (target)")
        for x, n in zip(xs, names, strict=True):
            if n in memory and "lora" in memory:
                mem = memory[n] / memory["lora"]
                right.text(x, base[x] + extra[x] + 0.01, f"mem {mem:.3f}x", ha="center", fontsize=7)
        right.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
        right.set_ylabel(f"amortised step time ({clock}) / lora")
        right.set_title("time per step relative to lora (labels: peak memory / lora)")
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def layer_micro(args: argparse.Namespace) -> None:
    """Forward + backward of one adapted layer with a zero and a non-zero low-rank anchor.

    ``AdaptedLinear`` as shipped (anchor and delta are two separate low-rank chains, each with its
    own output and add) against a prototype that fuses them: one ``x @ [down; lora_A]^T`` and one
    ``addmm`` into the base output. Same FLOPs; the fused form reads ``x`` once and writes one
    ``(T, out)`` tensor instead of three. CPU time, one thread, median of ``--micro-reps`` blocks.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pesocli.layers import AdaptedLinear, LowRankAnchor
    from pesocli.methods.lora import LoRADelta

    def timed(fn, x) -> float:
        for _ in range(5):
            fn(x).sum().backward()
        blocks = []
        for _ in range(args.micro_reps):
            start = time.process_time()
            for _ in range(20):
                fn(x).sum().backward()
            blocks.append((time.process_time() - start) / 20)
        return 1000 * statistics.median(blocks)

    tokens = args.batch * args.seq
    shapes = [(96, 96), (176, 96), (768, 768), (2048, 768)]
    print(f"one layer, T = {tokens} tokens, r = {args.rank}, CPU ms per forward + backward")
    print(
        f"{'out x in':>10} {'lora':>8} "
        + " ".join(f"{'R=' + str(r) + ' now':>10} {'fused':>7}" for r in (16, 48))
    )
    for out, inp in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, inp, requires_grad=True)
        row = []
        for rank in (0, 16, 48):
            base = nn.Linear(inp, out, bias=False).requires_grad_(False)
            anchor = LowRankAnchor(out, inp)
            if rank:
                anchor.absorb(torch.randn(out, rank) * 0.01, torch.randn(rank, inp) * 0.01)
            layer = AdaptedLinear(base, LoRADelta(out, inp, args.rank, args.alpha / args.rank), anchor)
            row.append(timed(layer, x))
            if rank:
                delta = layer.delta

                def fused(x, base=base, anchor=anchor, delta=delta):
                    h = F.linear(x, torch.cat([anchor.down, delta.lora_A]))
                    return torch.addmm(base(x), h, torch.cat([anchor.up, delta.lora_B * delta.scale], 1).T)

                row.append(timed(fused, x))
        print(
            f"{out:>5}x{inp:<4} {row[0]:>8.2f} {row[1]:>10.2f} {row[2]:>7.2f} {row[3]:>10.2f} {row[4]:>7.2f}"
        )


def paired_peft(args: argparse.Namespace) -> None:
    """Our ``lora`` and PEFT's LoRA on two copies of the same model in one process, alternating.

    Between processes the step time of the same method moves by a few percent (load, memory
    layout); alternating the two in one process cancels that. CPU time of forward + backward and
    of clip + optimizer step, median over ``--steps`` alternations.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from pesocli.config import load_config
    from pesocli.engine import Engine
    from pesocli.methods import build_method
    from pesocli.optim import PesoAdamW

    device = torch.device(args.device)
    ours, vocab = build_model(args.model, device, torch.float32)
    theirs, _ = build_model(args.model, device, torch.float32)
    cfg = load_config(None, {"method.name": "lora", "method.rank": args.rank, "method.alpha": args.alpha})
    method = build_method(cfg.method, "lora")
    method.setup(total_steps=args.steps, steps_per_epoch=args.steps)
    engine = Engine(ours, method, cfg.fullgrad)
    theirs = get_peft_model(
        theirs, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=list(TARGETS))
    )
    sides = {
        "lora": (ours, engine.trainable_parameters(), PesoAdamW),
        PEFT: (theirs, [p for p in theirs.parameters() if p.requires_grad], torch.optim.AdamW),
    }
    sides = {k: (m, ps, cls(ps, lr=args.lr, weight_decay=0.0)) for k, (m, ps, cls) in sides.items()}
    generator = torch.Generator().manual_seed(args.seed)
    times = {f"{k} {part}": [] for k in sides for part in ("fwd+bwd", "clip+step")}
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        for name, (model, params, optimizer) in sides.items():
            start = time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            middle = time.process_time()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.process_time()
            if step >= args.warmup:
                times[f"{name} fwd+bwd"].append(middle - start)
                times[f"{name} clip+step"].append(end - middle)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch} x {args.seq}, {args.steps} alternations, CPU ms (median)")
    for part in ("fwd+bwd", "clip+step"):
        ours_ms, peft_ms = 1000 * med[f"lora {part}"], 1000 * med[f"{PEFT} {part}"]
        print(f"{part:<10} lora {ours_ms:8.2f}  {PEFT} {peft_ms:8.2f}  ratio {ours_ms / peft_ms:.3f}")
    total = (med["lora fwd+bwd"] + med["lora clip+step"]) / (
        med[f"{PEFT} fwd+bwd"] + med[f"{PEFT} clip+step"]
    )
    print(f"{'step':<10} ratio lora / {PEFT} {total:.3f}")


def code_fingerprint() -> dict:
    """Git HEAD and a hash of the working tree's ``pesocli/*.py`` (others edit it while we measure)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "pesocli").rglob("*.py")):
        digest.update(path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        head = None
    return {"git_head": head, "pesocli_sha256": digest.hexdigest()[:16]}


def default_methods() -> list[str]:
    from pesocli.methods import METHODS

    return [*METHODS, PEFT]


def _rounded(value):
    """Floats to 6 significant digits, recursively (keeps the JSON of per-step timings small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def report(
    args: argparse.Namespace,
    runs: dict[str, list[dict]],
    clock: str,
    seconds: float,
    code: dict | None = None,
    tensor_runs: dict[str, dict] | None = None,
) -> None:
    """Aggregate, print the table, write JSON and the plot (also used by ``--from-json``)."""
    by_clock = {
        c: {spec: aggregate([summarise_run(r, args.warmup, c) for r in rs]) for spec, rs in runs.items()}
        for c in ("cpu", "wall")
    }
    results = by_clock[clock]
    header = (
        f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} steps, rank {args.rank}, "
        f"restart_every {args.restart_every}, device {args.device}, {args.repeats} interleaved repeats "
        f"(medians), times on the {clock} clock, {seconds:.0f} s"
    )
    print()
    print(header)
    table = print_table(results, by_clock["wall"])
    table += "\n\n" + print_memory_table(results, tensor_runs)
    if args.json:
        payload = {
            "args": vars(args),
            "clock": clock,
            "header": header,
            "table": table,
            "results": results,
            "results_by_clock": by_clock,
            "runs": runs,
            "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
            "code": code or code_fingerprint(),
            "tensor_runs": tensor_runs or {},
        }
        Path(args.json).write_text(json.dumps(_rounded(payload), separators=(",", ":"), default=str))
        print(f"wrote {args.json}")
    if args.plot:
        title = (
            f"{args.model}: batch {args.batch} x {args.seq}, {args.steps} steps, r={args.rank}, "
            f"K={args.restart_every}, {args.device}, {args.repeats} repeats, {clock} clock"
        )
        plot(results, runs, args.plot, title, clock, tensor_runs)


def run_driver(args: argparse.Namespace) -> None:
    if args.tensor_memory is None:
        args.tensor_memory = not args.device.startswith("cuda")
    if args.timing is None:
        args.timing = "processes" if args.device.startswith("cuda") else "interleaved"
    specs = (args.methods or default_methods()) + [e for e in args.extra if e not in (args.methods or [])]
    clock = args.clock if args.clock != "auto" else ("wall" if args.device.startswith("cuda") else "cpu")
    passthrough = [
        "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
        "--device", args.device, "--dtype", args.dtype, "--rank", str(args.rank), "--alpha", str(args.alpha),
        "--restart-every", str(args.restart_every), "--lr", str(args.lr), "--seed", str(args.seed),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    runs: dict[str, list[dict]] = {spec: [] for spec in specs}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats if args.timing == "interleaved" else 0):
            out = Path(tmp) / "runs.json"
            cmd = [
                sys.executable, __file__, "--interleaved-worker", *specs, "--first", str(rep),
                "--worker-out", str(out), *passthrough,
            ]  # fmt: skip
            load = os.getloadavg()[0]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"[interleaved repeat {rep}] failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            for spec, run in json.loads(out.read_text()).items():
                run["loadavg_before"] = load
                runs[spec].append(run)
                s = summarise_run(run, args.warmup, clock)
                print(
                    f"repeat {rep} {spec:<34} median {s['median_step_s']:.4f} s {clock}  "
                    f"restarts {s['restarts']} ({s['restart_total_s']:.2f} s)  load {load:.2f}",
                    flush=True,
                )
        for rep in range(args.repeats if args.timing == "processes" else 0):
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
            for spec in order:
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(out), *passthrough]
                load = os.getloadavg()[0]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"[{spec}] failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                run = json.loads(out.read_text())
                run["loadavg_before"] = load
                runs[spec].append(run)
                s = summarise_run(run, args.warmup, clock)
                w = summarise_run(run, args.warmup, "wall")
                print(
                    f"repeat {rep} {spec:<34} median {s['median_step_s']:.4f} s {clock} "
                    f"({w['median_step_s']:.4f} s wall)  restarts {s['restarts']} "
                    f"({s['restart_total_s']:.2f} s)  peak {s['peak_bytes'] / 2**20:.1f} MiB  "
                    f"load {load:.2f}",
                    flush=True,
                )
        tensor_runs = {}
        if args.tensor_memory:
            memory_args = [*passthrough, "--tensor-memory"]
            memory_args[memory_args.index("--steps") + 1] = str(args.restart_every + 3)
            for spec in specs:
                out = Path(tmp) / "memory.json"
                cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(out), *memory_args]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"[{spec}] memory run failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                run = json.loads(out.read_text())
                tensor_runs[spec] = {
                    k: run[k]
                    for k in ("tensor_peak_bytes", "weights_bytes", "restart_steps", "tensor_peaks_from_step")
                }
                print(f"tensor memory {spec:<34} {run['tensor_peak_bytes'] / 2**20:.2f} MiB", flush=True)
    runs = {k: v for k, v in runs.items() if v}
    report(args, runs, clock, time.time() - started, tensor_runs=tensor_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "100m"), default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"method specs (default: every registered method and {PEFT})",
    )
    parser.add_argument(
        "--extra",
        nargs="+",
        default=[],
        help="more specs after --methods (or the default list), e.g. variants",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on CUDA), bf16, fp32")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--restart-every", type=int, default=50, help="K for methods with restart_every")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="auto: process CPU time on CPU (robust to other users of a shared machine), wall time on CUDA",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="(with --worker) profile this many steps with torch.profiler; table on stderr",
    )
    parser.add_argument(
        "--profile-from", type=int, default=None, help="first profiled step (default: --warmup)"
    )
    parser.add_argument("--profile-rows", type=int, default=25, help="rows of the profile table")
    parser.add_argument(
        "--layer-micro",
        action="store_true",
        help="time one adapted layer with and without an anchor, and exit",
    )
    parser.add_argument("--micro-reps", type=int, default=15)
    parser.add_argument(
        "--paired-peft",
        action="store_true",
        help="our lora and PEFT's LoRA alternating in one process, and exit",
    )
    parser.add_argument(
        "--tensor-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak live tensor bytes (pesocli.memory.measure_peak) around the restart at "
        "--restart-every, in one extra untimed run per method (default: on for CPU)",
    )
    parser.add_argument(
        "--from-json", default=None, help="re-print the table (and --plot) from a saved --json"
    )
    parser.add_argument(
        "--timing",
        choices=("interleaved", "processes"),
        default=None,
        help="interleaved: every method in one process per repeat, steps alternating (steady ratios; "
        "default on CPU); processes: one process per method and repeat (needed for CUDA peak memory; "
        "default on CUDA)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = MODEL_DEFAULTS[args.model]
    args.batch = args.batch or defaults["batch"]
    args.seq = args.seq or defaults["seq"]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key, value in saved["args"].items():
            if key not in ("json", "plot", "from_json"):
                setattr(args, key, value)
        code = saved.get("code")
        report(args, saved["runs"], saved.get("clock", "cpu"), 0.0, code, saved.get("tensor_runs"))
        print(f"(re-reported from {args.from_json}; measured with {code})")
        return
    if args.layer_micro:
        layer_micro(args)
        return
    if args.paired_peft:
        paired_peft(args)
        return
    if args.interleaved_worker:
        results = run_interleaved_worker(args, args.interleaved_worker, args.first)
        Path(args.worker_out).write_text(json.dumps(results, default=str))
        return
    if args.worker:
        result = run_worker(args)
        text = json.dumps(result, default=str)
        if args.worker_out:
            Path(args.worker_out).write_text(text)
        else:
            s = summarise_run(result, args.warmup)
            print(json.dumps({k: v for k, v in s.items() if not isinstance(v, list)}, indent=1))
        return
    if not math.isfinite(args.lr):
        parser.error("--lr must be finite")
    run_driver(args)


if __name__ == "__main__":
    main()
