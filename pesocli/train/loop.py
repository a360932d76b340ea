"""``peso train``: one loop for the CPU, one GPU and several processes (``torchrun`` / ``--nproc``).

Reads top to bottom: set lr -> maybe restart -> micro-steps -> sum gradients over processes ->
judge the step -> update (method hooks around clipping, optimizer step; a method that splits the step
gets a second pass over the same micro-batches for its second group) -> log -> maybe evaluate ->
maybe checkpoint -> stop if signalled. Everything method-specific happens behind
:class:`~pesocli.engine.Engine`; everything a checkpoint holds is one
:class:`~pesocli.train.resume.TrainerState`; everything about several processes (sharing the batch,
summing gradients, rank 0 writing) is in :mod:`pesocli.train.distributed` and is a no-op in one
process.

The loss of a step is the mean over every trained token of the step's (global) batch, however the
batch is split into micro-batches and processes: each micro-batch's summed token loss is divided by
the step's trained tokens, so ``grad_accum`` and ``nproc`` trade against each other exactly.

Failures: every input is validated and the model, data and method are built before the run
folder is created. A fresh run that fails before its first checkpoint removes its folder; after
that, the folder stays with its checkpoints and ``--resume`` continues it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pesocli.config import RunConfig, config_from_dict, config_to_dict
from pesocli.data import IGNORE, DataBundle, build_datasets, collate, example_preview, num_batches
from pesocli.engine import Engine, RngReplay
from pesocli.errors import ConfigError, Interrupted, NumericalError
from pesocli.inspect.runlog import RESTARTS_VERSION
from pesocli.methods import RestartRecord, build_method, method_class
from pesocli.models import load_model_and_tokenizer, prepare_model, resolve_device
from pesocli.optim import PesoAdamW
from pesocli.quant import quant_support_error
from pesocli.train import distributed
from pesocli.train.distributed import PeerRunFolder, World
from pesocli.train.guards import Snapshot, StopSignals, Watchdog, nonfinite_layers
from pesocli.train.lr import build_scheduler
from pesocli.train.progress import Reporter, describe_plan, format_bytes
from pesocli.train.resume import (
    Mark,
    ResumePoint,
    RunCounters,
    TrainerState,
    check_config_unchanged,
    require_resume_point,
    warn,
)
from pesocli.train.runfolder import RunFolder, check_free
from pesocli.train.state import read_state_json
from pesocli.train.stream import BatchStream, placeholder_batch


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


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The *summed* next-token cross-entropy over the trained (label != -100) tokens of ``batch``.

    A sum, not a mean: the caller divides by the trained tokens of the whole (global) batch, which
    is what makes micro-batches and processes add up to the 1-process gradient. The logits of the
    trained positions are upcast to FP32 first, as transformers' own loss does.
    """
    labels = batch["labels"][:, 1:]
    trained = labels != IGNORE
    # Logits only from the first position any row trains on: an instruction record's prompt needs
    # no vocabulary projection (the lm_head is ~20% of a 135M model's step); the same sum either way.
    first = _first_trained_position(trained)
    keep = first > 0 and _keeps_logits(type(model))
    extra = {"logits_to_keep": labels.shape[1] + 1 - first} if keep else {}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,  # no KV cache in training (and none under gradient checkpointing)
        **extra,
    ).logits
    start = labels.shape[1] + 1 - logits.shape[1]  # the label column of the first kept logit
    kept = trained[:, start:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1][kept].float(), labels[:, start:][kept], reduction="sum"
    )


def _first_trained_position(trained: torch.Tensor) -> int:
    """The first column of ``trained (batch, seq - 1)`` with a trained label in any row (0 if none)."""
    columns = trained.any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else 0


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether ``model_class.forward`` takes transformers' ``logits_to_keep`` (all its causal LMs do).

    Asked once per class, not per micro-batch."""
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def trained_tokens(batches_: list[dict[str, torch.Tensor] | None]) -> int:
    """Tokens with a loss (label != -100 after the shift) in ``batches_`` (``None``: an empty share)."""
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches_ if b is not None)


def input_tokens(batches_: list[dict[str, torch.Tensor] | None]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches_ if b is not None)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    bundle: DataBundle,
    batch_size: int,
    device: torch.device,
    world: World | None = None,
) -> float:
    """Token-weighted mean loss over the validation examples (each process takes its share of each batch)."""
    world = world or World()
    model.eval()
    total, count = 0.0, 0
    pad, width = bundle.pad_token_id, batch_size * world.size
    for start in range(0, len(bundle.val), width):
        chosen = bundle.val[start : start + width]
        mine = chosen[distributed.share(len(chosen), world.rank, world.size)]
        # an empty share still runs a (zero-loss) pass: FSDP gathers weights in every pass
        batch = _to(collate(mine, pad), device) if mine else placeholder_batch(pad, device)
        count += trained_tokens([batch])
        total += float(lm_loss(model, batch))
    model.train()
    total, count = world.sum([total, count])
    return total / max(count, 1)


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def check_ranks(engine: Engine, rank: int) -> None:
    """A rank at or above ``min(out, in)`` of a layer is not low-rank (and breaks SVD-based methods)."""
    for name, layer in engine.layers.items():
        limit = min(layer.out_features, layer.in_features)
        if rank >= limit:
            raise ConfigError(
                f"method.rank {rank} must be below min(out, in) = {limit} of every adapted layer; "
                f"{name} is ({layer.out_features}, {layer.in_features})"
            )


def print_dry_run(cfg: RunConfig, bundle: DataBundle, tokenizer, reporter: Reporter) -> None:
    """Print the resolved config, the data statistics and the first example, then stop."""
    import yaml

    console = reporter.console
    console.print("[bold]resolved config[/bold]")
    console.print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    console.print(f"[bold]data[/bold] {bundle.stats.summary()}")
    if bundle.train:  # piped, --no-color or NO_COLOR: no style would show, so the text marks masked runs
        plain = console.no_color or not console.is_terminal
        for line in example_preview(bundle.train[0], tokenizer, markers=plain):
            console.print(line, soft_wrap=True)


def run_training(
    cfg: RunConfig,
    *,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    resume: Path | None = None,
) -> TrainResult:
    """Train ``cfg`` end to end and write its run folder; returns the headline numbers.

    ``resume``: a run folder to continue from its newest good checkpoint (``cfg`` may differ from
    the run's only in ``pesocli.train.resume.RESUME_SAFE_KEYS``). In a process ``torchrun`` started,
    this joins the others (:func:`pesocli.train.distributed.session`) and rank 0's config and
    resume decision hold for all.
    """
    with distributed.session(cfg.train) as world:
        return _train(cfg, world, dry_run=dry_run, reporter=reporter, resume=resume)


def _settle(
    cfg: RunConfig, world: World, resume: Path | None, dry_run: bool
) -> tuple[RunConfig, ResumePoint | None]:
    """Rank 0 decides which run this is (config, resume point); every process takes its decision."""
    distributed.settle_world_size(cfg, world, warn if world.is_main else _silent)

    def decide() -> ResumePoint | None:
        if resume is not None:
            point = require_resume_point(Path(resume))
            check_config_unchanged(point.state["config"], cfg, Path(resume))
            return point
        if not dry_run:
            check_free(cfg)  # fail before loading anything
        return None

    point = world.on_main(decide)
    if not world.active:
        return cfg, point
    mine = {"config": config_to_dict(cfg)}
    if point is not None:
        mine["point"] = {"folder": str(point.folder), "step": point.step, "finished": point.finished}
    decided = world.broadcast_json(mine if world.is_main else None)
    if world.is_main:
        return cfg, point
    where = decided.get("point")
    if where is not None:
        folder = Path(where["folder"])
        point = ResumePoint(folder, read_state_json(folder), int(where["step"]), bool(where["finished"]))
    return config_from_dict(decided["config"], "rank 0's config"), point


def _load_backbone(cfg: RunConfig, device: torch.device, world: World):
    """The backbone on ``device``; with ``train.fsdp`` read on the CPU and sharded over the processes."""
    if not cfg.train.fsdp:
        model, tokenizer = load_model_and_tokenizer(cfg.model, device)
        return prepare_model(model, cfg.model), tokenizer
    model_cfg = cfg.model
    if model_cfg.dtype == "auto" and device.type == "cuda":
        model_cfg = dataclasses.replace(model_cfg, dtype="bf16")  # what auto means on the GPU
    model, tokenizer = load_model_and_tokenizer(model_cfg, "cpu")  # each process reads it once, then shards
    prepare_model(model, cfg.model)
    distributed.shard_backbone(model, world)
    return model, tokenizer


def _train(
    cfg: RunConfig, world: World, *, dry_run: bool, reporter: Reporter | None, resume: Path | None
) -> TrainResult:
    started = time.perf_counter()
    cfg, point = _settle(cfg, world, resume, dry_run)
    say = warn if world.is_main else _silent
    if not world.is_main:
        reporter = Reporter(0, quiet=True)
    if point is not None and point.finished:
        return _already_finished(cfg, point, reporter)
    unsupported = quant_support_error(cfg.method_name, method_class(cfg.method_name), cfg.model.quant)
    if unsupported:
        raise ConfigError(unsupported)
    distributed.check_supported(cfg, method_class(cfg.method_name), world)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = _load_backbone(cfg, device, world)
    bundle = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    global_batch = cfg.train.batch_size * world.size
    steps_per_epoch = max(1, math.ceil(num_batches(len(bundle.train), global_batch) / cfg.train.grad_accum))
    steps = total_steps(cfg, steps_per_epoch)
    reporter = reporter or Reporter(steps, quiet=cfg.train.quiet)
    if dry_run:
        if world.is_main:
            print_dry_run(cfg, bundle, tokenizer, reporter)
        return TrainResult(None, math.nan, math.nan, 0, 0, time.perf_counter() - started)

    method = build_method(cfg.method, cfg.method_name)
    method.setup(total_steps=steps, steps_per_epoch=steps_per_epoch)
    torch.manual_seed(cfg.train.seed)  # adapters: independent of the model build; same on every rank
    engine = Engine(model, method, cfg.fullgrad)
    check_ranks(engine, cfg.method.rank)
    model.train()
    o = cfg.optim
    optimizer = PesoAdamW(
        engine.trainable_parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_ratio=o.warmup_ratio, kind=o.scheduler,
                                multiplier=method.lr_multiplier)
    stream = BatchStream(
        bundle, cfg.train.batch_size, cfg.train.seed, device, rank=world.rank, world_size=world.size
    )
    data_stats = {k: getattr(bundle.stats, k) for k in ("records", "examples", "tokens", "trained_tokens")}
    trainer = TrainerState(
        cfg, engine, optimizer, scheduler, stream, Watchdog(cfg.train), RunCounters(), steps, data_stats
    )
    start_step = 0
    if point is not None:
        _check_same_batches(point, stream)
        start_step = trainer.load(point)
        distributed.restore_rank_rng(point.state, point.folder, world)
    guard = contextlib.ExitStack()  # signals wait for the end of a step from here on
    signals = guard.enter_context(StopSignals())
    try:
        opened = world.on_main(
            lambda: RunFolder.reopen(cfg, start_step) if point is not None else RunFolder.create(cfg)
        )
    except BaseException:
        guard.close()
        raise
    run = opened if world.is_main else PeerRunFolder(cfg.run_dir)
    counters, watchdog = trainer.counters, trainer.watchdog
    prior_seconds = counters.wall_seconds  # training time of earlier sessions of this run
    reporter.note(f"peso train {cfg.method_name} on {cfg.model.name}: {bundle.stats.summary()}")
    if world.active:
        reporter.note(
            f"{world.size} processes{' (FSDP2)' if cfg.train.fsdp else ''}: global batch "
            f"{world.size} x {cfg.train.batch_size} x {cfg.train.grad_accum} sequences per step"
        )
    reporter.note(
        f"{len(engine.layers)} adapted layers, "
        f"{sum(p.numel() for p in engine.trainable_parameters()):,} trainable parameters, "
        f"{steps} steps -> {run.path}"
    )
    plan, too_long = describe_plan(
        steps, global_batch * cfg.train.grad_accum, len(bundle.train), bundle.stats.tokens
    )
    reporter.note(plan)
    if too_long is not None and point is None:
        say(too_long)
    if point is not None:
        reporter.note(f"resuming at step {start_step} from {point.folder}")

    def checkpoint(step: int, mark: Mark | None = None) -> Path:
        """Every process calls this; rank 0 writes (with every rank's RNG) while the others wait."""
        mark = mark or trainer.mark()
        mark.counters["wall_seconds"] = prior_seconds + time.perf_counter() - started
        mark = distributed.gather_rng(mark, world)

        def write() -> None:
            trainer.save(run.checkpoint_dir(step), step, mark)
            run.commit_checkpoint(step, cfg.checkpoint.keep_last)

        world.on_main(write)
        return run.checkpoint_dir(step)

    def stop(step: int, problem: str, mark: Mark, snapshot: Snapshot | None) -> NumericalError:
        """Go back to the state before this step, write it as a checkpoint and say why."""
        optimizer.zero_grad(set_to_none=True)
        why = f"step {step + 1}: {problem}"
        if watchdog.policy == "skip":
            why += f" ({watchdog.consecutive} bad steps in a row)"
        if snapshot is not None and not snapshot.exact:
            return NumericalError(
                f"{why}; the restart of this step changed dense anchors in place, so the "
                f"last good state is the newest checkpoint in {run.checkpoints}"
            )
        if snapshot is not None:
            snapshot.restore(engine.layers, optimizer, method)
        folder = checkpoint(step, mark)
        return NumericalError(
            f"{why}; wrote the last good state to {folder}; resume with --resume {run.path} "
            "(--nan-policy skip drops such steps)"
        )

    def fill(batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return batch if batch is not None else stream.placeholder()

    def gradient_pass(micro: list[dict[str, torch.Tensor] | None], trained: float) -> float:
        """Forward + backward of this process's micro-batches; their summed loss / ``trained`` tokens."""
        total = 0.0
        for batch in micro:
            loss = lm_loss(model, fill(batch)) / max(trained, 1.0)
            loss.backward()
            total += float(loss.detach())
        return total

    def update(step: int, phases: list, micro: list, trained: float, replay: RngReplay | None):
        """The step's updates, one per group of ``engine.phases(step)``: ``(problem, grad norm)``.

        A later group steps on the gradients of a second forward + backward over the same micro-batches
        (same dropout draws, loss normalisation, all-reduce and watchdog), taken after the first group
        stepped. If that pass is bad, the first group's update is undone: the step did not happen.
        """
        undo = Snapshot.take(engine.layers, optimizer, method) if len(phases) > 1 else None
        norms = [engine.update(optimizer, step, o.max_grad_norm, phases[0])]
        for params in phases[1:]:
            optimizer.zero_grad(set_to_none=True)
            with replay.replay():
                loss = gradient_pass(micro, trained)
            (loss,) = world.reduce_gradients(engine.trainable_parameters(), [loss])
            problem = watchdog.verdict(loss, engine.layers)
            if problem is not None:
                undo.restore(engine.layers, optimizer, method)
                return f"second gradient pass: {problem}", None
            norms.append(engine.update(optimizer, step, o.max_grad_norm, params))
        return None, None if norms[0] is None else math.hypot(*(float(n) for n in norms))

    restart_steps = [s for s in range(steps) if method.restart_due(s)]
    eval_loss = None
    last_checkpoint = start_step if point is not None else None
    checkpoint_clock = time.perf_counter()  # wall time since the last checkpoint (checkpoint.every_minutes)
    window_tokens, window_start = 0, time.perf_counter()
    try:
        with guard, reporter:
            for step in range(start_step, steps):
                mark = trainer.mark()  # the state before this step, should it have to be undone
                micro = [stream.next() for _ in range(cfg.train.grad_accum)]  # this process's shares
                records: list[RestartRecord] = []
                snapshot = None
                if method.restart_due(step):
                    restart_batches = micro[: cfg.fullgrad.batches]
                    while len(restart_batches) < cfg.fullgrad.batches:
                        restart_batches.append(stream.next())
                    (restart_trained,) = world.sum([trained_tokens(restart_batches)])
                    restart_trained = max(restart_trained, 1.0)

                    def restart_pass(batches_=restart_batches, trained=restart_trained) -> None:
                        with world.forked_rng():  # every pass (and rank) leaves the restart's RNG alone
                            for batch in batches_:
                                (lm_loss(model, fill(batch)) / trained).backward()

                    with world.restart_rng(cfg.train.seed, step):
                        records, snapshot = _restart_safely(step, engine, optimizer, restart_pass, say)
                    if any(r.kind != "kept-old-subspace" for r in records):
                        counters.restarts += 1
                        counters.restart_seconds += engine.last_restart_seconds
                    if records:
                        energies = sorted(r.captured_energy for r in records if r.captured_energy is not None)
                        reporter.restart(
                            step + 1, len({r.layer for r in records}), engine.last_restart_seconds,
                            energies[len(energies) // 2] if energies else None,
                            counters.loss_tail[-1] if counters.loss_tail else None,
                        )
                    if records:  # logged 1-based, as the progress bar and metrics.jsonl count steps
                        run.log_restarts([
                            dict(r.to_json(), step=r.step + 1, version=RESTARTS_VERSION,
                                 seconds_total=engine.last_restart_seconds)
                            for r in records
                        ])

                # the step's loss: the mean over the trained tokens of all micro-batches of all
                # processes, so each process needs the global count before its backward
                step_trained, step_tokens = world.sum([trained_tokens(micro), input_tokens(micro)])
                phases = engine.phases(step)  # [all], or [first, rest]: rest steps on a second pass
                replay = RngReplay() if len(phases) > 1 else None  # that pass draws this one's dropout
                with engine.training_step(step):
                    step_loss = gradient_pass(micro, step_trained)
                # one flattened all-reduce: every adapter gradient, the loss and the stop votes
                # (and whether this process's checkpoint clock ran out: all processes checkpoint together)
                votes = [float(signals.signum == signal.SIGINT), float(signals.signum == signal.SIGTERM),
                         float(_clock_due(cfg.checkpoint.every_minutes, checkpoint_clock))]
                step_loss, *votes = world.reduce_gradients(engine.trainable_parameters(), [step_loss, *votes])
                clock_due = votes.pop() > 0
                step_tokens = int(step_tokens)
                counters.tokens += step_tokens
                window_tokens += step_tokens

                lr = optimizer.param_groups[0]["lr"]
                grad_norm = None
                problem = watchdog.verdict(step_loss, engine.layers)  # before anything uses the gradients
                if problem is None:
                    problem, grad_norm = update(step, phases, micro, step_trained, replay)
                if problem is None:
                    watchdog.accept(step_loss)
                    counters.add_loss(step_loss)
                elif watchdog.reject():
                    raise stop(step, problem, mark, snapshot)
                else:
                    say(f"step {step + 1}: {problem}; update skipped (nan_policy skip)")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                now = time.perf_counter()
                metrics = {
                    "step": step + 1,
                    "loss": step_loss if math.isfinite(step_loss) else None,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": counters.tokens,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "restart": bool(records),
                    "next_restart_in": next((s - step for s in restart_steps if s > step), None),
                    "elapsed_s": prior_seconds + now - started,
                }
                if problem is not None:
                    metrics["skipped"] = problem
                window_tokens, window_start = 0, now
                logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == steps
                if logged or problem is not None or records:  # a restart's step is always logged
                    run.log_metrics(metrics)
                if problem is None:
                    reporter.step(step, metrics)
                # (the last step's eval is the final one below, run once)
                if bundle.val and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 \
                        and step + 1 < steps:
                    eval_loss = evaluate(model, bundle, cfg.train.batch_size, device, world)
                    run.log_metrics({"step": step + 1, "eval_loss": eval_loss})
                    reporter.evaluation(step + 1, eval_loss)
                by_steps = cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0
                if (by_steps or clock_due) and step + 1 < steps:
                    checkpoint(step + 1)
                    last_checkpoint, checkpoint_clock = step + 1, time.perf_counter()
                # several processes stop on the votes of this step's all-reduce, so all after the same step
                signum = _stop_signal(votes) if world.active else signals.signum
                if signum is not None and step + 1 < steps:
                    done = last_checkpoint == step + 1
                    folder = run.checkpoint_dir(step + 1) if done else checkpoint(step + 1)
                    name = signal.Signals(signum).name
                    raise Interrupted(
                        f"{name} after step {step + 1} of {steps}: wrote a full checkpoint to {folder}; "
                        f"continue with: peso train --resume {run.path}",
                        signum,
                    )
            if bundle.val:
                eval_loss = evaluate(model, bundle, cfg.train.batch_size, device, world)
                run.log_metrics({"step": steps, "eval_loss": eval_loss})
                reporter.evaluation(steps, eval_loss)
            final_mark = trainer.mark()
            final_mark.counters["wall_seconds"] = prior_seconds + time.perf_counter() - started
            world.on_main(lambda: trainer.save(run.final, steps, final_mark, final=True))
    except BaseException:
        if point is None and last_checkpoint is None and not run.has_checkpoint():
            run.remove()  # a fresh run with nothing resumable: leave nothing half-written behind
        else:
            run.close()
        raise
    run.close()

    seconds = prior_seconds + time.perf_counter() - started
    tail = counters.loss_tail[-max(1, min(10, steps // 10)) :]
    initial = counters.initial_loss if counters.initial_loss is not None else math.nan
    final = sum(tail) / len(tail) if tail else math.nan
    result = TrainResult(run.path, initial, final, steps, counters.restarts, seconds, eval_loss)
    summary = {
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "steps": steps,
        "restarts": counters.restarts,
        "restart_seconds": counters.restart_seconds,
        "skipped_steps": watchdog.skipped,
        "wall_seconds": seconds,
        "eval_loss": eval_loss,
        "tokens": counters.tokens,
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    if world.active:
        summary["processes"] = world.size
    world.on_main(lambda: run.write_summary(summary))
    if not world.is_main:
        return result  # rank 0 exports alone: no timeout applies to it
    rows = [
        ("method", cfg.method_name),
        ("model", cfg.model.name),
        ("initial loss", f"{result.initial_loss:.4f}"),
        ("final loss (last steps)", f"{result.final_loss:.4f}"),
        ("restarts", f"{counters.restarts} ({counters.restart_seconds:.1f} s)"),
        ("steps", str(steps) + (f" ({watchdog.skipped} skipped)" if watchdog.skipped else "")),
        ("wall time", f"{seconds:.1f} s"),
        ("peak memory", format_bytes(summary["peak_memory_bytes"])),
        ("run folder", str(run.path)),
    ]
    if eval_loss is not None:
        rows.insert(4, ("eval loss", f"{eval_loss:.4f}"))
    if world.active:
        rows.insert(2, ("processes", f"{world.size}{' (FSDP2)' if cfg.train.fsdp else ''}"))
    # FSDP: the backbone does not fit one device; the export reloads it on the CPU
    export_device = torch.device("cpu") if cfg.train.fsdp else device
    rows.extend(export_finished_run(run.path, cfg, export_device, reporter))
    reporter.summary(rows)
    return result


def _silent(message: str) -> None:
    del message


def _clock_due(minutes: float, since: float) -> bool:
    """Whether ``minutes`` (> 0) of wall time passed since ``since`` (a ``time.perf_counter()``)."""
    return minutes > 0 and time.perf_counter() - since >= 60.0 * minutes


def _stop_signal(votes: list[float]) -> int | None:
    """The signal some process got during this step (SIGINT wins), from the summed votes."""
    if votes[0] > 0:
        return signal.SIGINT
    if votes[1] > 0:
        return signal.SIGTERM
    return None


def _check_same_batches(point: ResumePoint, stream: BatchStream) -> None:
    """A run continues with the global batch it started with (``nproc x batch_size``)."""
    saved = point.state.get("data", {}).get("batches_per_epoch")
    if saved is not None and int(saved) != stream.batches_per_epoch:
        raise ConfigError(
            f"cannot resume {point.folder}: its global batch (train.nproc x train.batch_size) differs from "
            f"this run's {stream.world_size} x {stream.batch_size} ({saved} batches per epoch, now "
            f"{stream.batches_per_epoch}); resume with the processes it was started with"
        )


def export_finished_run(
    run_dir: Path, cfg: RunConfig, device: torch.device, reporter: Reporter
) -> list[tuple[str, str]]:
    """Write ``cfg.train.export`` formats into ``<run>/export/<format>``; summary rows for each.

    The export is reloaded and checked against the trained model before it is renamed into place
    (``pesocli.export``); the serve command is in its README.md.
    """
    formats = [f for f in cfg.train.export if f != "none"]
    if not formats:
        return []
    from pesocli.export.formats import ExportOptions, export_run
    from pesocli.runs import load_run

    loaded = load_run(run_dir, device=str(device))
    rows = []
    for fmt in formats:
        result = export_run(
            loaded, fmt, run_dir / "export" / fmt, ExportOptions(force=True), say=reporter.note
        )
        written = sum(p.stat().st_size for p in result.out.rglob("*") if p.is_file())
        what = f"{format_bytes(written)} written to {result.out}"
        external = result.manifest.get("parts", {}).get("adapter_base_external")
        if external is not None:
            what += f" (the adapter only: the base {external} is used in place, not copied)"
        rows.append((f"export ({fmt})", f"{what}; serve: see {result.out}/README.md"))
    return rows


def _restart_safely(
    step: int, engine: Engine, optimizer: PesoAdamW, run_pass, say=warn
) -> tuple[list[RestartRecord], Snapshot]:
    """``engine.maybe_restart``; a layer left with non-finite numbers keeps its old subspace.

    A restart that raises ``LinAlgError`` (an SVD of non-finite numbers) is undone in every layer.
    Returns the restart records and the snapshot taken before the restart.
    """
    method = engine.method
    snapshot = Snapshot.take(engine.layers, optimizer, method)
    try:
        records = engine.maybe_restart(step, optimizer, run_pass)
        bad, reason = nonfinite_layers(engine.layers, optimizer), "non-finite factors"
    except torch.linalg.LinAlgError as exc:
        records, bad = [], list(engine.layers)
        reason = f"the restart failed: {str(exc).splitlines()[0]}"
        method.load_state_dict(snapshot.method_state)
    if not bad:
        return records, snapshot
    stuck = [name for name in bad if not snapshot.can_restore(name)]
    if stuck:
        raise NumericalError(
            f"the restart before step {step + 1} left non-finite numbers in the dense anchor of {stuck[0]} "
            f"({reason}; {len(stuck)} layers), which cannot be rolled back; resume from the newest checkpoint"
        )
    for name in bad:
        snapshot.restore_layer(name, engine.layers[name], optimizer)
    say(
        f"restart before step {step + 1}: {reason} in {len(bad)} of {len(engine.layers)} layers "
        f"(first {bad[0]}); those layers keep their old subspace"
    )
    kept = [
        RestartRecord(
            step=step,
            layer=name,
            method=method.name,
            kind="kept-old-subspace",
            rank=method.config.rank,
            anchor_rank=engine.layers[name].anchor.rank,
            extra={"reason": reason},
        )
        for name in bad
    ]
    return [r for r in records if r.layer not in set(bad)] + kept, snapshot


def _already_finished(cfg: RunConfig, point: ResumePoint, reporter: Reporter | None) -> TrainResult:
    """``--resume`` of a completed run: nothing to do; report what its summary says."""
    import json

    steps = point.step
    reporter = reporter or Reporter(steps, quiet=cfg.train.quiet)
    run_dir = point.folder.parent
    reporter.note(f"{run_dir} already finished all {steps} steps; nothing to resume")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return TrainResult(
        run_dir,
        summary.get("initial_loss", math.nan),
        summary.get("final_loss", math.nan),
        steps,
        int(summary.get("restarts", 0)),
        0.0,
        summary.get("eval_loss"),
    )
