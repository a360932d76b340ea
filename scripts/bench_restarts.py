"""Step time and peak memory against the number of restarts (0 .. 16): peso-r and its anchor options
against ``lora`` and PEFT's LoRA, as ratios to ``lora`` measured in the same process.

What grows with the restarts is peso-r's anchor (``continuous``: ``2r`` ranks per restart up to
``anchor_rank_cap``), a cost paid at *every* step after; the restart itself is paid once per ``K`` steps.
So the curve is measured with the restarts close together: every method (one copy of the model each,
``benchlib.side.Side``, ``peso train``'s step order) steps through the same plan, one step of each
method before the next step of any, the order rotating every step (ABAB... in one process, so the
load of a shared machine falls on all alike). Restart-capable methods restart before the steps the
plan marks (their own schedule is replaced by the plan): after the init, restart ``n`` (``n = 1 ..
--restarts``) comes right before the step that follows restart ``n - 1``'s, except at the measured
points (``--points``), where ``--timed-steps`` steps are timed before the next restart. At each point:
the median of each method's step times (process CPU time: one thread, one process) and its ratio to
``lora``'s, with the spread of the per-step ratios (step ``i`` of a method over step ``i`` of ``lora``,
next to each other in time). The amortised ratio at a restart period ``K`` (``--k``) adds each
method's median restart time / ``K``.

Memory (``--memory``, default on): under ``pesocli.memory.measure_peak`` (peak live tensor bytes, the
weights and the anchor included) one more step of every method after point 0, and after the plan a
plain step (the steady state after the last restart) and a restart + step. The last is an upper
bound: the profiler never sees the frees of tensors allocated before it started, so the anchor pairs
a restart replaces stay counted (up to the anchor's size twice). The anchor's bytes are counted at
every point.

    OMP_NUM_THREADS=1 python scripts/bench_restarts.py --model smollm2-135m \\
        --json docs/figures/bench_restarts_smollm2.json --plot docs/figures/bench_restarts_smollm2.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

from benchlib.models import MODEL_DEFAULTS, MODELS, build_model, random_batches
from benchlib.side import PEFT, Side, parse_spec
from benchlib.summary import code_fingerprint, rounded

DEFAULT_SPECS = (
    "lora",
    PEFT,
    "peso-r",
    "peso-r:anchor_max_rank=16",
    "peso-r:anchor_dtype=bf16",
    "peso-r:anchor_mode=fold",
)


def build_plan(points: list[int], restarts: int, timed: int, warmup: int) -> list[tuple[bool, int | None]]:
    """``[(restart_before_this_step, point or None)]``: the init restart, ``warmup`` untimed steps, then
    restarts 1..``restarts``; ``timed`` steps are timed at each point (0 = after the init)."""
    plan: list[tuple[bool, int | None]] = [(True, None)] + [(False, None)] * (warmup - 1)
    plan += [(False, 0)] * timed if 0 in points else []
    for n in range(1, restarts + 1):
        if n in points:
            plan += [(True, n)] + [(False, n)] * (timed - 1)
        else:
            plan.append((True, None))
    return plan


def anchor_bytes(side: Side) -> int:
    """Bytes of the anchors of ``side`` (0 for lora, PEFT and a folded anchor)."""
    if side.engine is None:
        return 0
    total = 0
    for layer in side.engine.layers.values():
        for tensor in layer.anchor.state_tensors().values():
            if layer.anchor.mode != "fold":
                total += tensor.numel() * tensor.element_size()
    return total


def anchor_rank(side: Side) -> int:
    return max((layer.anchor.rank for layer in side.engine.layers.values()), default=0) if side.engine else 0


def memory_step(side: Side, step: int, ids, restart: bool) -> int:
    """Peak live tensor bytes (weights included) of one step of ``side``, its restart included."""
    from pesocli.memory import measure_peak

    method = side.engine.method if side.engine is not None else None
    planned = method.restart_due if method is not None else None
    if method is not None:
        method.restart_due = lambda s, r=restart: r
    try:
        return measure_peak(lambda: side.step(step, ids), side.model, side.optimizer, side.device).peak_bytes
    finally:
        if method is not None:
            method.restart_due = planned  # the plan's restarts again


def run(args: argparse.Namespace) -> dict:
    import torch

    from pesocli.models import resolve_dtype

    device = torch.device("cpu")
    dtype = resolve_dtype("fp32", device)
    points = sorted(set(args.points))
    plan = build_plan(points, args.restarts, args.timed_steps, args.warmup)
    args.steps = len(plan) + 3  # the scheduler's length (+ the memory steps)
    args.restart_every = max(len(plan), 1)  # unused: the plan decides restarts
    base, vocab = build_model(args.model, device, dtype)
    sides = []
    for spec in args.methods:
        torch.manual_seed(args.seed)
        model = copy.deepcopy(base)
        model.train()
        side = Side(args, spec, model, device)
        restart_at = {i for i, (restart, _) in enumerate(plan) if restart}
        if side.engine is not None:
            side.engine.method.restart_due = lambda s, at=restart_at: s in at  # the plan's restarts
        sides.append(side)
    del base
    data = random_batches(args, vocab, device)
    out: dict = {spec: {"points": {}, "restart_cpu_s": []} for spec in args.methods}
    memory: dict = {spec: {} for spec in args.methods}
    started = time.time()
    for step, (_, point) in enumerate(plan):
        at = (args.first + step) % len(sides)
        for side in sides[at:] + sides[:at]:
            side.step(step, data[step])
            cell = out[side.spec]
            if side.series["restart_cpu_s"][-1] > 0:
                cell["restart_cpu_s"].append(side.series["restart_cpu_s"][-1])
            if point is not None:
                p = cell["points"].setdefault(point, {"step_cpu_s": [], "step_s": []})
                p["step_cpu_s"].append(side.series["step_cpu_s"][-1])
                p["step_s"].append(side.series["step_s"][-1])
                p["anchor_rank"], p["anchor_bytes"] = anchor_rank(side), anchor_bytes(side)
        done = point is not None and (step + 1 == len(plan) or plan[step + 1][1] != point)
        if done:
            print(f"point {point:>2} done at step {step} ({time.time() - started:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
        if args.memory and point == 0 and done:
            for side in sides:  # point 0: a plain step (no restart)
                memory[side.spec]["point0"] = memory_step(side, step, data[step], restart=False)
    if args.memory:
        for side in sides:  # after the last restart: a plain step (steady state), then a restart + step
            memory[side.spec]["end"] = memory_step(side, len(plan), data[-1], restart=False)
            memory[side.spec]["end_restart"] = memory_step(side, len(plan) + 1, data[-2], restart=True)
            memory[side.spec]["end_anchor_bytes"] = anchor_bytes(side)
    for side in sides:
        out[side.spec]["loss_last"] = side.series["losses"][-1]
        out[side.spec]["memory"] = memory[side.spec]
    return {"results": out, "seconds": time.time() - started}


def summarise(results: dict, ks: list[int]) -> dict:
    """Per method and point: median step time, ratio to lora (median and spread of per-step ratios),
    amortised ratios at each K; memory ratios to lora."""
    lora = results["lora"]
    table: dict = {}
    for spec, cell in results.items():
        restart_s = statistics.median(cell["restart_cpu_s"][1:] or cell["restart_cpu_s"] or [0.0])
        rows = {}
        for point, p in cell["points"].items():
            ref = lora["points"][point]["step_cpu_s"]
            mine = p["step_cpu_s"]
            per_step = [a / b for a, b in zip(mine, ref, strict=True)]
            med, med_ref = statistics.median(mine), statistics.median(ref)
            rows[int(point)] = {
                "median_step_s": med,
                "x_lora": med / med_ref,
                "x_lora_min": min(per_step),
                "x_lora_max": max(per_step),
                **{f"amortised_x_lora_k{k}": (med + restart_s / k) / med_ref for k in ks},
                "anchor_rank": p["anchor_rank"],
                "anchor_mib": p["anchor_bytes"] / 2**20,
            }
        mem, mem_lora = cell.get("memory", {}), lora.get("memory", {})
        table[spec] = {
            "restart_s": restart_s,
            "points": rows,
            "memory_x_lora": {k: mem[k] / mem_lora[k] for k in ("point0", "end", "end_restart")
                              if k in mem and k in mem_lora},
            "memory_mib": {k: v / 2**20 for k, v in mem.items()},
        }
    return table


def print_summary(table: dict, ks: list[int]) -> str:
    lines = []
    points = sorted({p for t in table.values() for p in t["points"]})
    head = f"{'method':<28} {'restart s':>9} " + " ".join(f"{'n=' + str(p):>17}" for p in points)
    lines += ["step time / lora (median over timed steps; [min-max of per-step ratios])", head,
              "-" * len(head)]
    for spec, t in table.items():
        cells = []
        for p in points:
            r = t["points"].get(p)
            cells.append(f"{r['x_lora']:.3f} [{r['x_lora_min']:.2f}-{r['x_lora_max']:.2f}]" if r else "-")
        lines.append(f"{spec:<28} {t['restart_s']:>9.2f} " + " ".join(f"{c:>17}" for c in cells))
    for k in ks:
        lines.append("")
        lines.append(f"amortised at K = {k}: (median step + median restart / K) / lora's median step")
        for spec, t in table.items():
            cells = [f"{t['points'][p][f'amortised_x_lora_k{k}']:.3f}" if p in t["points"] else "-"
                     for p in points]
            lines.append(f"{spec:<28} {'':>9} " + " ".join(f"{c:>17}" for c in cells))
    lines += ["", "anchor rank (max over layers) / anchor MiB"]
    for spec, t in table.items():
        cells = [f"{t['points'][p]['anchor_rank']} / {t['points'][p]['anchor_mib']:.1f}"
                 if p in t["points"] else "-" for p in points]
        lines.append(f"{spec:<28} {'':>9} " + " ".join(f"{c:>17}" for c in cells))
    lines += ["", "peak live tensor MiB, weights included (x lora): a step after the init / a step after "
              "the last restart / a restart + step (an upper bound: see the module docstring)"]
    for spec, t in table.items():
        m, x = t["memory_mib"], t["memory_x_lora"]
        cells = [f"{m[k]:.1f} ({x.get(k, 0):.3f})" if k in m else "-"
                 for k in ("point0", "end", "end_restart")]
        lines.append(f"{spec:<28} " + " ".join(f"{c:>20}" for c in cells))
    text = "\n".join(lines)
    print(text)
    return text


def plot(table: dict, path: str, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for spec, t in table.items():
        points = sorted(t["points"])
        ys = [t["points"][p][f"amortised_x_lora_k{k}"] for p in points]
        lo = [t["points"][p]["x_lora_min"] for p in points]
        hi = [t["points"][p]["x_lora_max"] for p in points]
        (line,) = left.plot(points, ys, marker="o", ms=3, label=spec, lw=1.1)
        left.fill_between(points, lo, hi, color=line.get_color(), alpha=0.12)
        right.plot(points, [t["points"][p]["anchor_mib"] for p in points], marker="o", ms=3, label=spec)
    left.axhline(1.02, color="k", ls="--", lw=0.8, label="1.02 (target)")
    left.set_xlabel("restarts so far")
    left.set_ylabel(f"step time / lora (amortised at K = {k}; band: per-step ratios)")
    left.legend(fontsize=6)
    right.set_xlabel("restarts so far")
    right.set_ylabel("anchor MiB (all layers)")
    for spec, t in table.items():
        x = t["memory_x_lora"].get("end")
        if x is not None:
            right.annotate(f"{spec}: peak after the last restart {x:.3f}x lora",
                           xy=(0.02, 0.95 - 0.06 * list(table).index(spec)),
                           xycoords="axes fraction", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_SPECS),
                        help="method specs (benchlib.side); lora must be one of them")
    parser.add_argument("--points", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--restarts", type=int, default=16)
    parser.add_argument("--timed-steps", type=int, default=4, help="steps timed at each point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the init restart")
    parser.add_argument("--k", type=int, nargs="+", default=[50, 500], help="restart periods to amortise at")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="which method steps first at step 0")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--from-json", default=None, help="re-print (and --plot) a saved run")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        table = summarise(saved["results"], saved["args"]["k"])
        print_summary(table, saved["args"]["k"])
        if args.plot:
            plot(table, args.plot, saved["title"], saved["args"]["k"][-1])
        return
    if "lora" not in [parse_spec(s)[0] for s in args.methods]:
        parser.error("--methods must include lora (the ratios' reference)")
    args.batch = args.batch or MODEL_DEFAULTS[args.model]["batch"]
    args.seq = args.seq or MODEL_DEFAULTS[args.model]["seq"]
    measured = run(args)
    results = {spec: {**cell, "points": {int(p): v for p, v in cell["points"].items()}}
               for spec, cell in measured["results"].items()}
    table = summarise(results, args.k)
    title = (f"{args.model}: batch {args.batch} x {args.seq}, r = {args.rank}, restarts 0..{args.restarts}, "
             f"{args.timed_steps} timed steps per point, interleaved in one process, CPU time, "
             f"{measured['seconds']:.0f} s, load {os.getloadavg()[0]:.1f}")
    print(title)
    text = print_summary(table, args.k)
    if args.json:
        payload = {"args": vars(args), "title": title, "table_text": text, "summary": table,
                   "results": results, "code": code_fingerprint(),
                   "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()}}
        Path(args.json).write_text(json.dumps(rounded(payload), separators=(",", ":"), default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot(table, args.plot, title, args.k[-1])


if __name__ == "__main__":
    main()
