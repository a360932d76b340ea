"""Quality at equal steps: ``peso-r`` at ranks 2 / 4 / 8 against ``lora`` at rank 8 (Table 6 at small scale).

Every run is the embedded default (``commands/tiny-peso-r.yaml``: the built-in tiny Llama on the
shipped arithmetic data, 300 steps, batch 16, lr 1e-2, ``K = 100``) trained by
``pesocli.train.run_training``, with only the method, the rank and the seed changed, and the
shipped ``arith_eval.jsonl`` (200 records, disjoint from training) as validation data. Reported:
final eval loss (token-weighted, from the trainer) and, when ``pesocli.evaluate`` is available,
greedy exact match of the ``#### answer`` on the same eval set (``peso eval``'s ``exact-match``).
``alpha`` stays 16 at every rank (scale ``alpha / r``), as the paper's Table 8 does; with
``--alpha-per-rank S`` it is ``S * r`` instead (the same scale ``S`` at every rank).

    OMP_NUM_THREADS=1 python scripts/quality_rank.py --json docs/figures/quality_rank.json \\
        --plot docs/figures/quality_rank.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pesocli.config import embedded_config_path, load_config
from pesocli.paths import default_eval_data
from pesocli.train import run_training

CONFIGS = [("lora", 8), ("peso-r", 2), ("peso-r", 4), ("peso-r", 8)]


def exact_match(run_dir: Path, out: Path, max_new_tokens: int) -> float | None:
    """``peso eval``'s exact match of a run folder on the shipped eval set (``None``: no evaluator)."""
    if importlib.util.find_spec("pesocli.evaluate") is None:
        return None
    from rich.console import Console

    from pesocli.evaluate import EvalConfig
    from pesocli.evaluate.runner import run_eval

    cfg = EvalConfig(
        data=str(default_eval_data()),
        metrics=("exact-match",),
        max_new_tokens=max_new_tokens,
        device="cpu",
        quiet=True,
        out=str(out),
    )
    return run_eval(str(run_dir), cfg, console=Console(quiet=True)).value("exact-match")


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    curve = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record and record["eval_loss"] is not None:
            curve.append((record["step"], record["eval_loss"]))
    return curve


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for r in rows:
        if r["curve"]:
            steps, losses = zip(*r["curve"], strict=True)
            left.plot(
                steps,
                losses,
                "o-",
                color=colors[r["label"]],
                alpha=0.8,
                label=r["label"] if r["seed"] == rows[0]["seed"] else None,
            )
    for k in {r.get("restart_every") for r in rows} - {None}:
        last = max(r["steps"] for r in rows)
        for step in range(k, last, k):
            left.axvline(step, color="grey", ls=":", lw=0.8)
    left.set_xlabel("step (dotted: peso-r restarts)")
    left.set_ylabel("eval loss (arith_eval.jsonl)")
    left.set_title("eval loss during training (one line per seed)")
    left.legend(fontsize=8)
    for i, label in enumerate(labels):
        own = [r for r in rows if r["label"] == label]
        right.scatter([i] * len(own), [r["eval_loss"] for r in own], color=colors[label])
        right.hlines(statistics.mean(r["eval_loss"] for r in own), i - 0.25, i + 0.25, color=colors[label])
        ems = [r["exact_match"] for r in own if r["exact_match"] is not None]
        if ems:
            right.annotate(
                f"EM {100 * statistics.mean(ems):.1f}%",
                (i, max(r["eval_loss"] for r in own)),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    right.margins(y=0.15)
    right.set_xticks(range(len(labels)), labels)
    right.set_ylabel("final eval loss (dots: seeds, bar: mean)")
    right.set_title("final eval loss at equal steps")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the embedded 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{m}@{r}" for m, r in CONFIGS],
        help="METHOD@RANK entries (default: lora@8 peso-r@2 peso-r@4 peso-r@8)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="exact-match generation length")
    parser.add_argument(
        "--alpha-per-rank",
        type=float,
        default=None,
        help="alpha = this x rank (default: the YAML's alpha 16 at every rank)",
    )
    parser.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps (for the curves)")
    parser.add_argument("--no-exact-match", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for entry in args.configs:
            method, _, rank = entry.partition("@")
            for seed in args.seeds:
                label = f"{method} r={rank}"
                overrides = {
                    "method.name": method,
                    "method.rank": int(rank),
                    "train.seed": seed,
                    "train.output_dir": tmp,
                    "train.run_name": f"{method}-r{rank}-s{seed}",
                    "train.quiet": True,
                    "data.val_split": 0.0,
                    "data.val_path": str(default_eval_data()),
                    "train.eval_every": args.eval_every,
                }
                if args.alpha_per_rank is not None:
                    overrides["method.alpha"] = args.alpha_per_rank * int(rank)
                if args.steps is not None:
                    overrides["train.max_steps"] = args.steps
                cfg = load_config(embedded_config_path(), overrides)
                run_started = time.time()
                result = run_training(cfg)
                train_seconds = time.time() - run_started
                em = None
                if not args.no_exact_match:
                    em = exact_match(
                        result.run_dir, Path(tmp) / f"eval-{method}-{rank}-{seed}", args.max_new_tokens
                    )
                rows.append(
                    {
                        "label": label,
                        "method": method,
                        "rank": int(rank),
                        "seed": seed,
                        "steps": result.steps,
                        "restarts": result.restarts,
                        "train_loss": result.final_loss,
                        "eval_loss": result.eval_loss,
                        "exact_match": em,
                        "train_seconds": train_seconds,
                        "restart_every": getattr(cfg.method, "restart_every", None),
                        "curve": eval_curve(result.run_dir),
                    }
                )
                em_text = "-" if em is None else f"{100 * em:.1f}%"
                print(
                    f"{label:<12} seed {seed}: eval loss {result.eval_loss:.4f}  exact match {em_text}  "
                    f"train loss {result.final_loss:.4f}  "
                    f"({result.restarts} restarts, {train_seconds:.0f} s)",
                    flush=True,
                )
    lines = [
        f"{'config':<12} {'eval loss (per seed)':<24} {'mean':>7} {'exact match (per seed)':<24} {'mean':>7}",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        own = [r for r in rows if r["label"] == label]
        losses = [r["eval_loss"] for r in own]
        ems = [r["exact_match"] for r in own]
        em_seeds = " / ".join("-" if e is None else f"{100 * e:.1f}%" for e in ems)
        em_mean = "-" if None in ems else f"{100 * statistics.mean(ems):.1f}%"
        lines.append(
            f"{label:<12} {' / '.join(f'{v:.3f}' for v in losses):<24} {statistics.mean(losses):>7.3f} "
            f"{em_seeds:<24} {em_mean:>7}"
        )
    table = "\n".join(lines)
    steps = rows[0]["steps"] if rows else 0
    alpha = "alpha 16" if args.alpha_per_rank is None else f"alpha {args.alpha_per_rank:g} x r"
    header = f"embedded default, {steps} steps, {alpha}, seeds {args.seeds}, {time.time() - started:.0f} s"
    print()
    print(header)
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "header": header, "table": table, "rows": rows}, indent=1)
        )
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, header)


if __name__ == "__main__":
    main()
