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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib.micro import layer_micro, paired_peft
from benchlib.models import MODEL_DEFAULTS, MODELS
from benchlib.plots import plot
from benchlib.side import PEFT
from benchlib.summary import (
    aggregate,
    code_fingerprint,
    print_memory_table,
    print_table,
    rounded,
    summarise_run,
)
from benchlib.workers import run_interleaved_worker, run_worker


def default_methods() -> list[str]:
    from pesocli.methods import METHODS

    return [*METHODS, PEFT]


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
        Path(args.json).write_text(json.dumps(rounded(payload), separators=(",", ":"), default=str))
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
    parser.add_argument("--model", choices=MODELS, default="tiny")
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
