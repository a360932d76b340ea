"""``peso train``: one loop for CPU and one GPU (``torchrun`` arrives with [scale]).

Reads top to bottom: set lr -> maybe restart -> micro-steps -> method hook -> clip -> step ->
log -> maybe evaluate -> maybe checkpoint. Everything method-specific happens behind
:class:`~pesocli.engine.Engine`.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pesocli.config import RunConfig, config_to_dict
from pesocli.data import DataBundle, batches, build_datasets, num_batches, render_example
from pesocli.engine import Engine
from pesocli.errors import PesoError
from pesocli.methods import build_method
from pesocli.models import load_model_and_tokenizer, resolve_device
from pesocli.optim import PesoAdamW
from pesocli.train.lr import build_scheduler
from pesocli.train.progress import Reporter, format_bytes
from pesocli.train.runfolder import RunFolder
from pesocli.train.state import save_state


@dataclass
class TrainResult:
    run_dir: Path | None
    initial_loss: float
    final_loss: float
    steps: int
    restarts: int
    seconds: float
    eval_loss: float | None = None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def micro_batches(bundle: DataBundle, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training micro-batches, reshuffled every epoch by ``(seed, epoch)``."""
    epoch = 0
    while True:
        yield from batches(bundle.train, batch_size, seed, epoch, pad_token_id=bundle.pad_token_id)
        epoch += 1


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the trained (label != -100) tokens of ``batch``."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, bundle: DataBundle, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean loss over the validation examples."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches(bundle.val, batch_size, 0, 0, pad_token_id=bundle.pad_token_id, shuffle=False):
        batch = _to(batch, device)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(lm_loss(model, batch)) * tokens
        count += tokens
    model.train()
    return total / max(count, 1)


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def print_dry_run(cfg: RunConfig, bundle: DataBundle, tokenizer, reporter: Reporter) -> None:
    """Print the resolved config, the data statistics and the first example, then stop."""
    import yaml

    console = reporter.console
    console.print("[bold]resolved config[/bold]")
    console.print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    console.print(f"[bold]data[/bold] {bundle.stats.summary()}")
    if bundle.train:
        console.print("[bold]first example[/bold] ([dim]masked[/dim] / [green]trained[/green]):")
        console.print(render_example(bundle.train[0], tokenizer))


def run_training(cfg: RunConfig, *, dry_run: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train ``cfg`` end to end and write its run folder; returns the headline numbers."""
    started = time.perf_counter()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    bundle = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    steps_per_epoch = max(
        1, math.ceil(num_batches(len(bundle.train), cfg.train.batch_size) / cfg.train.grad_accum)
    )
    steps = total_steps(cfg, steps_per_epoch)
    reporter = reporter or Reporter(steps, quiet=cfg.train.quiet)
    if dry_run:
        print_dry_run(cfg, bundle, tokenizer, reporter)
        return TrainResult(None, math.nan, math.nan, 0, 0, time.perf_counter() - started)

    method = build_method(cfg.method, cfg.method_name)
    method.setup(total_steps=steps, steps_per_epoch=steps_per_epoch)
    torch.manual_seed(cfg.train.seed)  # adapter init independent of how the model was built
    engine = Engine(model, method, cfg.fullgrad)
    model.train()
    o = cfg.optim
    optimizer = PesoAdamW(
        engine.trainable_parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_ratio=o.warmup_ratio, kind=o.scheduler)
    run = RunFolder.create(cfg)
    reporter.note(f"[bold]peso train[/bold] {cfg.method_name} on {cfg.model.name}: {bundle.stats.summary()}")
    reporter.note(
        f"{len(engine.layers)} adapted layers, "
        f"{sum(p.numel() for p in engine.trainable_parameters()):,} trainable parameters, "
        f"{steps} steps -> {run.path}"
    )

    stream = micro_batches(bundle, cfg.train.batch_size, cfg.train.seed)
    restart_steps = [s for s in range(steps) if method.restart_due(s)]
    losses: list[float] = []
    restarts, restart_seconds, eval_loss = 0, 0.0, None
    tokens_seen, window_tokens, window_start = 0, 0, time.perf_counter()
    try:
        with reporter:
            for step in range(steps):
                micro = [_to(next(stream), device) for _ in range(cfg.train.grad_accum)]
                restart_batches = micro[: cfg.fullgrad.batches]
                while len(restart_batches) < cfg.fullgrad.batches:
                    restart_batches.append(_to(next(stream), device))

                def restart_pass(batches_=restart_batches) -> None:
                    for batch in batches_:
                        (lm_loss(model, batch) / len(batches_)).backward()

                records = engine.maybe_restart(step, optimizer, restart_pass)
                if records:
                    restarts += 1
                    restart_seconds += engine.last_restart_seconds
                    run.log_restarts(
                        [dict(r.to_json(), seconds_total=engine.last_restart_seconds) for r in records]
                    )

                step_loss = 0.0
                with engine.training_step():
                    for batch in micro:
                        loss = lm_loss(model, batch) / len(micro)
                        loss.backward()
                        step_loss += float(loss.detach())
                        n_tokens = int(batch["attention_mask"].sum())
                        tokens_seen += n_tokens
                        window_tokens += n_tokens
                if not math.isfinite(step_loss):
                    raise PesoError(
                        f"non-finite loss ({step_loss}) at step {step + 1}; lower --lr or check the data"
                    )
                engine.before_step(optimizer, step)
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(engine.trainable_parameters(), o.max_grad_norm)
                    if o.max_grad_norm > 0
                    else None
                )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)

                now = time.perf_counter()
                metrics = {
                    "step": step + 1,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": tokens_seen,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "restart": bool(records),
                    "next_restart_in": next((s - step for s in restart_steps if s > step), None),
                    "elapsed_s": now - started,
                }
                window_tokens, window_start = 0, now
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                    run.log_metrics(metrics)
                reporter.step(step, metrics)
                if bundle.val and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                    eval_loss = evaluate(model, bundle, cfg.train.batch_size, device)
                    run.log_metrics({"step": step + 1, "eval_loss": eval_loss})
                if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < steps:
                    _checkpoint(run, engine, optimizer, cfg, step + 1, scheduler)
        if bundle.val:
            eval_loss = evaluate(model, bundle, cfg.train.batch_size, device)
            run.log_metrics({"step": steps, "eval_loss": eval_loss})
        save_state(run.final, engine.layers, optimizer, _meta(cfg, engine, steps, scheduler))
    finally:
        run.close()

    seconds = time.perf_counter() - started
    tail = losses[-max(1, min(10, len(losses) // 10)) :]
    result = TrainResult(run.path, losses[0], sum(tail) / len(tail), steps, restarts, seconds, eval_loss)
    summary = {
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "steps": steps,
        "restarts": restarts,
        "restart_seconds": restart_seconds,
        "wall_seconds": seconds,
        "eval_loss": eval_loss,
        "tokens": tokens_seen,
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    run.write_summary(summary)
    rows = [
        ("method", cfg.method_name),
        ("model", cfg.model.name),
        ("initial loss", f"{result.initial_loss:.4f}"),
        ("final loss (last steps)", f"{result.final_loss:.4f}"),
        ("restarts", f"{restarts} ({restart_seconds:.1f} s)"),
        ("steps", str(steps)),
        ("wall time", f"{seconds:.1f} s"),
        ("peak memory", format_bytes(summary["peak_memory_bytes"])),
        ("run folder", str(run.path)),
    ]
    if eval_loss is not None:
        rows.insert(4, ("eval loss", f"{eval_loss:.4f}"))
    reporter.summary(rows)
    return result


def _meta(cfg: RunConfig, engine: Engine, step: int, scheduler) -> dict:
    return {
        "step": step,
        "method": cfg.method_name,
        "method_state": engine.method.state_dict(),
        "model": cfg.model.name,
        "scheduler": scheduler.state_dict(),
        "config": config_to_dict(cfg),
    }


def _checkpoint(
    run: RunFolder, engine: Engine, optimizer: PesoAdamW, cfg: RunConfig, step: int, scheduler
) -> None:
    save_state(
        run.checkpoints / f"step-{step:06d}", engine.layers, optimizer, _meta(cfg, engine, step, scheduler)
    )
    if cfg.checkpoint.keep_last:
        existing = sorted(run.checkpoints.glob("step-*"))
        for old in existing[: -cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
