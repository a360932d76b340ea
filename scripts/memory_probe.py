"""Peak memory of a restart against a training step, on the tiny model, on CPU.

    python scripts/memory_probe.py                      # the table below, ~15 s on 2 cores
    python scripts/memory_probe.py --quant nf4 --gradient-checkpointing --json out.json

For each setup it trains the built-in tiny Llama as ``peso train`` does (fixed batch of 16 x 128
random tokens, restart every 3 steps) and measures, with ``pesocli.memory.measure_peak`` (torch
profiler allocation events + live training-state tensors; see that module for why not RSS),
the peak of ordinary steps and of a later restart (``2 q + 2`` sketch passes, SVDs, anchor
absorption, moment rotation). The issue's target: restart peak / step peak <= 1.02.
Exits 1 when a setup misses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET = 1.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="peso-r", help="a method with restarts (default peso-r)")
    parser.add_argument("--quant", choices=("none", "nf4", "fp4", "int8", "all"), default="all")
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--fullgrad-mode", choices=("sketch", "exact"), default="sketch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from pesocli.memory import ProbeSetup, restart_memory_probe

    quants = ("none", "nf4", "int8") if args.quant == "all" else (args.quant,)
    ckpts = {"off": (False,), "on": (True,), "both": (False, True)}[args.gradient_checkpointing]
    rows = []
    print(f"{'method':8} {'quant':5} {'ckpt':4} {'state MiB':>9} {'step MiB':>9} {'restart MiB':>11} "
          f"{'ratio':>6}  {'step s':>6} {'restart s':>9}")
    for quant in quants:
        for ckpt in ckpts:
            setup = ProbeSetup(method=args.method, quant=quant, gradient_checkpointing=ckpt,
                               fullgrad_mode=args.fullgrad_mode, batch_size=args.batch_size,
                               seq_len=args.seq_len)
            row = restart_memory_probe(setup)
            rows.append(row)
            mib = 2.0**20
            print(f"{row['method']:8} {quant:5} {'on' if ckpt else 'off':4} {row['state_bytes'] / mib:9.2f} "
                  f"{row['step_peak_bytes'] / mib:9.2f} {row['restart_peak_bytes'] / mib:11.2f} "
                  f"{row['ratio']:6.3f}  {row['step_seconds']:6.3f} {row['restart_seconds']:9.3f}",
                  flush=True)
    worst = max(row["ratio"] for row in rows)
    print(f"worst restart/step peak ratio {worst:.3f} (target <= {TARGET})")
    if args.json is not None:
        args.json.write_text(json.dumps({"target": TARGET, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
