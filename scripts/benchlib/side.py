"""One method under benchmark: its set-up on a model and one timed optimizer step in ``peso train``'s order.

A method spec is ``NAME[:key=value,...]`` (``peso-r:fullgrad.power_iters=0,anchor_max_rank=16``; a bare
key is taken from the ``method`` section); ``peft-lora`` is PEFT's LoRA with ``torch.optim.AdamW``.
"""

from __future__ import annotations

import argparse
import os
import time

PEFT = "peft-lora"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``peso-r:fullgrad.power_iters=0,restart_every=100`` -> ``("peso-r", {...})``."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key if "." in key else f"method.{key}"] = value
    return name, overrides


def sync(device) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so a clock reads finished work."""
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
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()

            def restart_pass(ids_=ids) -> None:
                self.loss_of(ids_).backward()

            with torch.profiler.record_function("bench::restart"):
                records = engine.maybe_restart(step, self.optimizer, restart_pass)
            sync(device)
            if records:
                seconds_restart = time.perf_counter() - start
                cpu_restart = time.process_time() - cpu_start
                seconds_align = sum(r.seconds for r in records)
                self.restart_steps.append(step)
        sync(device)
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
        sync(device)
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
