"""Measure PESO-LoRA-R's two anchor updates (``paper`` vs ``continuous``, see ``pesocli/methods/peso_r.py``).

Runs (1) the Appendix A problem and (2) the embedded tiny LM on the shipped arithmetic data,
both with several restarts, and prints final losses side by side. The better variant is the
default of ``method.anchor_update``; the figures go to ``docs/BENCHMARKS.md``.

    python scripts/anchor_variants.py --json docs/figures/anchor_variants.json

Each variant is shown at every ``K`` of a small sweep, since the two prefer different ``K``.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from pesocli.config import load_config
from pesocli.paths import default_eval_data
from pesocli.synthetic import SyntheticProblem, run
from pesocli.train import run_training

VARIANTS = ("paper", "continuous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="tiny-LM optimizer steps")
    parser.add_argument("--lm-k", type=int, nargs="+", default=[25, 50, 100], help="K values for the tiny LM")
    parser.add_argument(
        "--synthetic-k", type=int, nargs="+", default=[10, 20, 50, 100], help="K values for Appendix A"
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for variant in VARIANTS:
        for k in args.synthetic_k:
            final = run("peso-r", SyntheticProblem(restart_every=k), anchor_update=variant)[-1]
            rows.append({"problem": "appendix-a", "variant": variant, "K": k, "final_loss": final})
            print(f"appendix-a  {variant:<11} K={k:<4} final loss {final:.3e}", flush=True)
        for k in args.lm_k:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as out:
                    cfg = load_config(
                        None,
                        {
                            "method.name": "peso-r",
                            "method.anchor_update": variant,
                            "method.restart_every": k,
                            "method.gamma": 16.0,
                            "optim.lr": args.lr,
                            "train.max_steps": args.steps,
                            "train.batch_size": 16,
                            "train.seed": seed,
                            "train.output_dir": out,
                            "train.run_name": "run",
                            "train.quiet": True,
                            "data.val_path": str(default_eval_data()),
                        },
                    )
                    result = run_training(cfg)
                rows.append(
                    {
                        "problem": "tiny-lm",
                        "variant": variant,
                        "K": k,
                        "seed": seed,
                        "train_loss": result.final_loss,
                        "eval_loss": result.eval_loss,
                    }
                )
                print(
                    f"tiny-lm     {variant:<11} K={k:<4} seed {seed} eval loss {result.eval_loss:.4f} "
                    f"train loss {result.final_loss:.4f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
