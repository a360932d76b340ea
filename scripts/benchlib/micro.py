"""Diagnostics: one adapted layer with and without an anchor; our LoRA against PEFT's alternating."""

from __future__ import annotations

import argparse
import statistics
import time

from benchlib.models import build_model
from benchlib.side import PEFT, TARGETS


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
