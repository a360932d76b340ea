"""What each anchor option costs in precision, on a trained run's real anchors (issue 18).

Takes a finished ``peso-r`` run with a ``lowrank`` FP32 anchor (``W~ - W0 = up @ down`` per layer, the
reference) and measures, layer by layer and on the whole model's logits, how far each option puts the
model from ``W0 + anchor``:

- ``fold`` into an FP32 base and into a BF16 base: ``W~`` rounded to the base's dtype. The run's
  anchor is folded in ``--pieces`` equal absorbs (each rounds once; the run's own per-restart pieces
  are not saved, so equal pieces stand in for them), and the BF16 reference is the BF16-rounded ``W0``
  plus the factored FP32 anchor (what a BF16 base with the default anchor computes);
- a BF16 anchor: the pair rounded to BF16;
- lossy truncation (``anchor_keep_energy``, ``anchor_max_rank``) applied once to the final anchor (in a
  run it applies after every absorb, so errors compound over restarts: a lower bound).

Weight error: ``||W_option - W_ref||_F / ||anchor||_F`` (median and max over layers). Logits error:
``||L_option - L_ref||_F / ||L_ref - L_W0||_F``, the error as a fraction of what the anchor does to the
logits, on ``--batch`` x ``--seq`` random tokens; every forward in FP32 (the BF16 cases put BF16-rounded
values into FP32 weights), so only the weights' precision differs.

    OMP_NUM_THREADS=1 python scripts/anchor_precision.py RUN_DIR --json docs/figures/anchor_precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def _set(layers, weights: dict[str, torch.Tensor] | None, anchors_on: bool) -> None:
    for name, layer in layers.items():
        if weights is not None:
            layer.base.weight.data.copy_(weights[name])
        layer.anchor.is_zero = not anchors_on or layer.anchor.rank == 0


def _truncate(up: torch.Tensor, down: torch.Tensor, *, keep_energy: float = 1.0,
              max_rank: int | None = None) -> tuple[torch.Tensor, float, int]:
    """Best approximation of ``up @ down`` under the rule: ``(matrix, dropped energy fraction, rank)``."""
    from pesocli.layers import LowRankAnchor

    anchor = LowRankAnchor(up.shape[0], down.shape[1], max_rank=max_rank, keep_energy=keep_energy)
    anchor.absorb(up, down)
    return anchor.materialize(), anchor.take_dropped_energy(), anchor.rank


@torch.no_grad()
def measure(run_dir: str, pieces: int, batch: int, seq: int, seed: int) -> dict:
    from pesocli.runs import load_run

    run = load_run(run_dir)
    layers = run.engine.layers
    assert all(layer.anchor.mode == "lowrank" for layer in layers.values()), "needs a lowrank anchor run"
    for layer in layers.values():  # the trained adapter stays out: only W0 + anchor is compared
        for p in layer.delta.parameters():
            p.zero_()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, run.model.config.vocab_size, (batch, seq), generator=generator)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    anchor = {n: (layer.anchor.up.double() @ layer.anchor.down.double()) for n, layer in layers.items()}

    def logits(weights, anchors_on: bool) -> torch.Tensor:
        _set(layers, weights, anchors_on)
        return run.model(input_ids=ids).logits.double()

    plain = logits(w0, False)
    reference = logits(w0, True)
    effect = float((reference - plain).norm())
    bf16_w0 = {n: w.to(torch.bfloat16).float() for n, w in w0.items()}
    bf16_plain = logits(bf16_w0, False)
    bf16_reference = logits(bf16_w0, True)
    out: dict = {"run": str(run_dir), "layers": len(layers), "pieces": pieces,
                 "anchor_rank_max": max(layer.anchor.rank for layer in layers.values()),
                 "anchor_logit_effect_fp32": effect / float(reference.norm()),
                 "options": {}}

    def record(label: str, weights: dict, ref_w: dict, ref_logits, base_plain, anchors_on=False, extra=None):
        errors = [float((weights[n].double() - ref_w[n]).norm() / anchor[n].norm()) for n in layers]
        got = logits(weights, anchors_on)
        out["options"][label] = {
            "weight_error_median": statistics.median(errors),
            "weight_error_max": max(errors),
            "logits_error": float((got - ref_logits).norm() / (ref_logits - base_plain).norm()),
            **(extra or {}),
        }

    exact = {n: w0[n].double() + anchor[n] for n in layers}
    exact_bf16 = {n: bf16_w0[n].double() + anchor[n] for n in layers}
    for dtype, label, start, ref_w, ref_l, base_l in (
        (torch.float32, "fold, FP32 base", w0, exact, reference, plain),
        (torch.bfloat16, "fold, BF16 base", bf16_w0, exact_bf16, bf16_reference, bf16_plain),
    ):
        folded = {}
        for n, layer in layers.items():
            w = start[n].to(dtype)
            piece = (layer.anchor.up.float() @ layer.anchor.down.float()) / pieces
            for _ in range(pieces):  # as LowRankAnchor.absorb in fold mode: an FP32 sum, rounded once
                w = (w.float() + piece).to(dtype)
            folded[n] = w.float()
        record(label, folded, ref_w, ref_l, base_l)
    bf16_anchor = {
        n: w0[n] + layer.anchor.up.to(torch.bfloat16).float() @ layer.anchor.down.to(torch.bfloat16).float()
        for n, layer in layers.items()
    }
    record("BF16 anchor (FP32 base)", bf16_anchor, exact, reference, plain)
    rules = (("keep_energy 0.999", {"keep_energy": 0.999}), ("keep_energy 0.99", {"keep_energy": 0.99}),
             ("keep_energy 0.9", {"keep_energy": 0.9}), ("max_rank 32", {"max_rank": 32}),
             ("max_rank 16", {"max_rank": 16}), ("max_rank 8", {"max_rank": 8}))
    for label, rule in rules:
        weights, dropped, ranks = {}, [], []
        for n, layer in layers.items():
            if layer.anchor.rank == 0:
                weights[n] = w0[n]
                continue
            approx, lost, rank = _truncate(layer.anchor.up.float(), layer.anchor.down.float(), **rule)
            weights[n] = w0[n] + approx
            dropped.append(lost)
            ranks.append(rank)
        record(label, weights, exact, reference, plain,
               extra={"dropped_energy_median": statistics.median(dropped),
                      "dropped_energy_max": max(dropped),
                      "rank_median": statistics.median(ranks), "rank_max": max(ranks)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished peso-r run folder with a lowrank anchor")
    parser.add_argument("--pieces", type=int, default=None,
                        help="absorbs to fold the anchor in (default: the run's absorbing restarts)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pieces = args.pieces
    if pieces is None:
        lines = (Path(args.run) / "restarts.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        pieces = max(1, len({r["step"] for r in records if r.get("kind") == "restart"}))
    result = measure(args.run, pieces, args.batch, args.seq, args.seed)
    print(f"{result['run']}: {result['layers']} layers, anchor rank <= {result['anchor_rank_max']}, "
          f"folded in {pieces} pieces; the anchor moves the logits by "
          f"{100 * result['anchor_logit_effect_fp32']:.1f}% of their norm")
    print(f"{'option':<26} {'weight err med':>14} {'max':>9} {'logits err':>10} {'dropped med':>11} "
          f"{'rank med':>8}")
    for label, r in result["options"].items():
        dropped = f"{r['dropped_energy_median']:.2e}" if "dropped_energy_median" in r else "-"
        rank = f"{r['rank_median']:.0f}" if "rank_median" in r else "-"
        print(f"{label:<26} {r['weight_error_median']:>14.2e} {r['weight_error_max']:>9.2e} "
              f"{r['logits_error']:>10.2e} {dropped:>11} {rank:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
