"""Several processes: ``peso train --nproc N`` or ``torchrun --nproc-per-node N -m pesocli.cli train``.

What is split and how (the decisions, in one place):

- **Data.** Every optimizer step takes the same global micro-batches a 1-process run with
  ``N x train.batch_size`` sequences per micro-batch takes; process ``r`` trains on its share of each
  (:func:`share`). The data position ``(epoch, batch)`` counts global batches, so it is the same on
  every rank and a checkpoint holds one.
- **Loss.** The step's loss is the mean over every trained token of the step's global batch: each
  process sums its token losses and divides by the trained tokens of *all* processes (one
  all-reduce of the counts before the forward). Per-rank means are never averaged, so the summed
  gradient equals the 1-process gradient whatever each share holds. The restart passes are
  normalised the same way.
- **Gradients: DDP without the wrapper.** Only the adapters are trainable, so after the step's
  micro-batches every process sums all adapter gradients, the step's loss and its stop votes in one
  flattened all-reduce (:meth:`World.reduce_gradients`): what DDP computes, minus the overlap of
  communication with the backward, which for adapters (well under 1% of the weights) buys little.
  No ``no_sync`` juggling with gradient accumulation, no hooks firing during the restart passes,
  and a process whose share of a batch is empty runs a placeholder batch with no trained token
  (zero gradient) instead of confusing a wrapper. Every process then clips and steps the same
  gradients, so the adapters stay identical without a broadcast.
- **Restarts.** Full-gradient sketches are linear in ``G``, so each sketch pass is summed with one
  flattened all-reduce (:func:`pesocli.dist.all_reduce_sum`, called by :mod:`pesocli.fullgrad`); the test
  matrix comes from ``fullgrad.seed`` on every rank, so every rank computes the same small QR and
  SVD from the same numbers and makes the same restart (no broadcast of the new factors). Anything
  a method draws at random during a restart comes from a generator seeded by
  ``(train.seed, step)`` on every rank (:meth:`World.restart_rng`), and the restart passes leave
  it untouched, whatever dropout draws in them.
- **Rank 0 writes.** The run folder, logs, checkpoints, ``final/``, the summary and the
  end-of-run export are rank 0's; the others hold a :class:`PeerRunFolder` and wait for each write
  in :meth:`World.on_main`, which also hands rank 0's error (disk full, ...) to every rank. The
  export runs on rank 0 after the others have left, so no timeout applies to it. Checkpoints hold
  every rank's RNG (dropout draws differ between ranks): ``rank<r>.*`` in ``rng.safetensors``.
- **Failures.** Every error a run raises on purpose (bad config, non-finite loss, SIGINT/SIGTERM)
  is raised on every rank at the same point; a process that dies makes the others' next collective
  fail (gloo: at once; NCCL: after ``train.dist_timeout`` seconds), which ends them with
  :class:`ProcessGroupError`; the process group is destroyed on the way out. SIGINT/SIGTERM is
  voted on in the step's all-reduce, so every rank stops after the same step.
- **FSDP2** (``train.fsdp``): the frozen backbone is sharded with ``fully_shard`` per decoder layer
  (:func:`shard_backbone`) *before* the adapters are injected, so the adapters, anchors and their
  optimizer state stay plain replicated tensors and everything above holds unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from pesocli import errors
from pesocli.dist import (
    ENV_RANK,
    ENV_WORLD,
    ProcessGroupError,
    all_reduce_sum,
    collective,
    first_line,
    flat,
    launched_rank,
    share,
)
from pesocli.errors import ConfigError, PesoError
from pesocli.train.runfolder import RunPaths

if TYPE_CHECKING:
    from pesocli.config import RunConfig, TrainConfig
    from pesocli.train.resume import Mark

T = TypeVar("T")

# The collectives live below the trainer (pesocli.dist, which pesocli.fullgrad uses too); these names
# are re-exported for the trainer's callers.
__all__ = ["ENV_RANK", "ENV_WORLD", "ProcessGroupError", "all_reduce_sum", "launched_rank", "share"]


@dataclasses.dataclass
class World:
    """This process's place among the processes of a run; one process (``active=False``) by default.

    Every method is a collective when ``active``: all ranks call it, in the same order.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    """Where collective buffers live (``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo)."""
    active: bool = False
    """A process group is up (``torchrun``); ``False`` for a plain single process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (FP64, exact for token counts)."""
        if not self.active:
            return [float(v) for v in values]
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        collective("an all-reduce", lambda: dist.all_reduce(buffer))
        return buffer.tolist()

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], extras: Sequence[float]) -> list[float]:
        """Sum every ``param.grad`` and ``extras`` over the processes in one flattened all-reduce.

        A parameter without a gradient counts as zero; it gets the summed gradient when any process
        had one and keeps ``None`` otherwise. Returns the summed ``extras``.
        """
        if not self.active:
            return [float(v) for v in extras]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = [float(p.grad is not None) for p in params]
        tail = torch.tensor([*present, *map(float, extras)], dtype=torch.float32, device=self.device)
        vector = torch.cat([flat(grads, self.device), tail]) if grads else tail
        collective("the gradient all-reduce", lambda: dist.all_reduce(vector))
        summed = vector[: vector.numel() - tail.numel()]
        seen_by = vector[summed.numel() : summed.numel() + len(params)].tolist()
        offset = 0
        for param, seen in zip(params, seen_by, strict=True):
            n = param.numel()
            if seen > 0:
                part = summed[offset : offset + n].view_as(param).to(param.dtype)
                if param.grad is None:
                    param.grad = part.clone()
                else:
                    param.grad.copy_(part)
            offset += n
        return vector[summed.numel() + len(params) :].tolist()

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON data) on every rank."""
        if not self.active:
            return obj
        data = json.dumps(obj).encode() if self.is_main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        collective("a broadcast", lambda: dist.broadcast(length, src=0))
        payload = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            if self.is_main
            else torch.empty(int(length), dtype=torch.uint8, device=self.device)
        )
        collective("a broadcast", lambda: dist.broadcast(payload, src=0))
        return json.loads(bytes(payload.cpu().tolist()).decode()) if not self.is_main else obj

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON data), in rank order, on every rank."""
        if not self.active:
            return [obj]
        data = json.dumps(obj).encode()
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        lengths = [torch.empty_like(length) for _ in range(self.size)]
        collective("a gather", lambda: dist.all_gather(lengths, length))
        width = max(int(n) for n in lengths)
        mine = torch.zeros(width, dtype=torch.uint8, device=self.device)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        collective("a gather", lambda: dist.all_gather(parts, mine))
        texts = [bytes(p[: int(n)].cpu().tolist()).decode() for p, n in zip(parts, lengths, strict=True)]
        return [json.loads(text) for text in texts]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 while the others wait; ``fn``'s result on rank 0, ``None`` elsewhere.

        An exception in ``fn`` is raised on every rank: the same :class:`~pesocli.errors.PesoError`
        class and message (a ``KeyboardInterrupt`` stays one), anything else as
        :class:`ProcessGroupError` naming it (rank 0 shows the traceback).
        """
        if not self.active:
            return fn()
        if not self.is_main:
            outcome = self.broadcast_json(None)
            if outcome["error"] is not None:
                raise _rebuild(outcome["error"])
            return None
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the others may be gone already
                self.broadcast_json({"error": _describe(exc)})
            raise
        self.broadcast_json({"error": None})
        return result

    @contextlib.contextmanager
    def restart_rng(self, seed: int, step: int) -> Iterator[None]:
        """Under several processes: torch draws inside come from ``(seed, step)``, the same on every rank.

        The RNG outside is left as it was. One process: a no-op (the run's own RNG stream is used, as
        it always was).
        """
        if not self.active:
            yield
            return
        with self.forked_rng():
            torch.default_generator.manual_seed(_mix(seed, step))
            if self.device.type == "cuda":
                torch.cuda.manual_seed(_mix(seed, step))
            yield

    @contextlib.contextmanager
    def forked_rng(self) -> Iterator[None]:
        """Under several processes: torch draws inside leave this process's RNG where it was."""
        if not self.active:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            yield


def _mix(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 0x5EED) % (2**63)


def _describe(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "signum": getattr(exc, "signum", None)}


def _rebuild(error: dict[str, Any]) -> BaseException:
    kind, message = error["type"], error["message"]
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if kind == "Interrupted":
        return errors.Interrupted(message, int(error["signum"]))
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, PesoError):
        return cls(message)
    if kind == ProcessGroupError.__name__:
        return ProcessGroupError(message)
    first = message.strip().splitlines()[0] if message.strip() else ""
    return ProcessGroupError(f"rank 0 failed ({kind}: {first})")


# ------------------------------------------------------------------------------ process group


@contextlib.contextmanager
def session(train: TrainConfig) -> Iterator[World]:
    """The :class:`World` of this process; starts the process group under ``torchrun`` and ends it.

    NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on the CPU; every collective gives up
    after ``train.dist_timeout`` seconds. Outside ``torchrun``, ``train.nproc > 1`` is refused: the
    processes are started by ``peso train --nproc N`` or ``torchrun``.
    """
    from pesocli.models import resolve_device

    rank = launched_rank()
    if rank is None:
        if train.nproc > 1:
            raise ConfigError(
                f"train.nproc is {train.nproc}: start the processes with peso train --nproc {train.nproc} "
                f"or torchrun --nproc-per-node {train.nproc} -m pesocli.cli train"
            )
        yield World()
        return
    device = resolve_device(train.device)
    if dist.is_initialized():  # someone else's process group (a library caller): use it, leave it up
        yield World(dist.get_rank(), dist.get_world_size(), _comm_device(device), active=True)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=train.dist_timeout)
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    except RuntimeError as exc:
        raise ProcessGroupError(
            f"process {rank}: cannot join the other processes ({first_line(exc)})"
        ) from exc
    world = World(dist.get_rank(), dist.get_world_size(), _comm_device(device), active=True)
    try:
        yield world
    except PesoError as exc:
        if not world.is_main:
            exc.reported_by_rank_0 = True  # every rank raises it; rank 0 says it (see cli/train.py)
        raise
    else:
        # Every rank is past its last collective before any tears the group down or leaves
        # (leave_now): a rank that finished first would close its gloo pairs under a peer still
        # reading them.
        with contextlib.suppress(Exception):
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def leave_now(code: int) -> NoReturn:
    """End this process of a multi-process run with ``code`` (its output printed), skipping the
    interpreter's teardown.

    ``dist.destroy_process_group`` only drops torch's own registry entries: the gloo group keeps
    ~10 references from torch's C++ side and lives, threads and all, into interpreter
    finalisation. There a process sometimes died of SIGABRT ("terminate called without an active
    exception", the symptom of a C++ thread touching Python objects of a finalising interpreter;
    cf. pytorch/pytorch#179291) instead of exiting with its code, after a failure (2 of ~16 CI
    runs of the 2-process failure test) and after a clean finish alike (1 of ~20 runs of a
    2-process run under load). Nothing of the run needs that teardown: checkpoints, exports and
    the run folder are written atomically and closed before this point, the peers have passed
    the final barrier (or see the closed sockets at once), and stdout/stderr are flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def settle_world_size(cfg: RunConfig, world: World, say: Callable[[str], None]) -> None:
    """Record the number of processes in ``cfg.train.nproc`` (the saved config then names it)."""
    if world.active and cfg.train.nproc != world.size:
        if cfg.train.nproc != 1:
            say(f"train.nproc is {cfg.train.nproc}, but {world.size} processes started; using {world.size}")
        cfg.train.nproc = world.size


def check_supported(cfg: RunConfig, method: type, world: World) -> None:
    """Refuse what several processes cannot do yet, in one line each."""
    from pesocli.methods.base import Method

    if cfg.train.fsdp and not world.active:
        raise ConfigError("train.fsdp shards the backbone over processes: start it with --nproc N (N > 1)")
    if cfg.train.fsdp and cfg.model.quant != "none":
        raise ConfigError(
            f"train.fsdp cannot shard a bitsandbytes backbone (model.quant {cfg.model.quant}); "
            "drop --fsdp (each process then holds the quantised backbone) or use --quant none"
        )
    if world.size > 1 and method.step_probe is not Method.step_probe:
        raise ConfigError(
            f"method {cfg.method_name} takes products with the full gradient at every step, which are "
            f"not summed over processes yet; train it with one process (--nproc 1)"
        )


# ------------------------------------------------------------------------------------- FSDP2


def shard_backbone(model: torch.nn.Module, world: World) -> None:
    """FSDP2: shard ``model``'s frozen weights over the processes (one ``fully_shard`` per decoder layer).

    Call before the adapters are injected: they then stay plain tensors, replicated on every rank,
    and their gradients are summed by :meth:`World.reduce_gradients` like without FSDP. The
    backbone's weights are all-gathered layer by layer in the forward and again in the backward.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for param in model.parameters():
        param.requires_grad_(False)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(
            f"train.fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); "
            "drop --fsdp"
        )
    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ------------------------------------------------------------------------------- RNG per rank


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().contiguous().numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def gather_rng(mark: Mark, world: World) -> Mark:
    """``mark`` with every rank's RNG added (rank 0's stays where a 1-process checkpoint has it).

    ``rng["ranks"][r]`` holds rank ``r``'s python/numpy states, ``rank<r>.torch`` and
    ``rank<r>.cuda.<i>`` its torch ones. A collective.
    """
    if not world.active or world.size == 1:
        return mark
    mine = {"rng": mark.rng, "tensors": {k: _encode(v) for k, v in mark.rng_tensors.items()}}
    everyone = world.gather_json(mine)
    tensors = dict(mark.rng_tensors)
    for rank, theirs in enumerate(everyone):
        if rank:
            tensors.update({f"rank{rank}.{k}": _decode(v) for k, v in theirs["tensors"].items()})
    return dataclasses.replace(
        mark, rng={**mark.rng, "ranks": [theirs["rng"] for theirs in everyone]}, rng_tensors=tensors
    )


def restore_rank_rng(state: dict[str, Any], folder: Path, world: World) -> None:
    """After ``TrainerState.load`` (which restores rank 0's RNG everywhere): this rank's own RNG."""
    from pesocli.train.resume import restore_rng
    from pesocli.train.state import read_tensors

    ranks = state.get("rng", {}).get("ranks") or []
    if world.rank == 0 or world.rank >= len(ranks):
        return
    prefix = f"rank{world.rank}."
    saved = read_tensors(folder, "rng.safetensors")
    tensors = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    restore_rng(ranks[world.rank], tensors)


# ----------------------------------------------------------------------- the run folder elsewhere


class PeerRunFolder(RunPaths):
    """The run folder as a rank other than 0 sees it: the same paths; every write is rank 0's."""

    def has_checkpoint(self) -> bool:
        return True  # nothing to clean up here either way

    def log_metrics(self, record: dict[str, Any]) -> None:
        pass

    def log_restarts(self, records: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass


# ----------------------------------------------------------------------------------- launching


def launch(cfg: RunConfig, *, resume: Path | None, dry_run: bool, debug: bool) -> int:
    """Run ``peso train`` in ``cfg.train.nproc`` processes on this machine; returns the exit code.

    The resolved config is written once and every process reads it, so all agree on the run folder
    and its name. Processes start through ``torch.distributed.run`` (``--standalone``: a free port);
    the exit code is the first failing process's (``128 + signal`` when it was killed), or
    ``128 + signal`` when this launcher was stopped by one, which it passes on: the processes finish
    their step, write a checkpoint and exit.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from pesocli.config import save_config

    if not debug:  # the processes say what went wrong themselves; the agent's log would repeat it
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
                logging.getLogger(name).setLevel(logging.CRITICAL)

    with tempfile.TemporaryDirectory(prefix="peso-launch-") as tmp:
        config = save_config(cfg, Path(tmp) / "config.yaml")
        args = ["--standalone", "--nproc-per-node", str(cfg.train.nproc), "-m", "pesocli.cli", "train",
                "--config", str(config)]  # fmt: skip
        if resume is not None:
            args += ["--resume", str(resume)]
        if dry_run:
            args.append("--dry-run")
        if debug:
            os.environ["PESO_DEBUG"] = "1"
        # torchrun's default grace of 30 s between passing a signal on and killing: long enough
        # for a step and a checkpoint of a small model only.
        os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(cfg.train.dist_timeout)))
        try:
            run(parse_args(args))
        except ChildFailedError as exc:
            return _exit_code({rank: failure.exitcode for rank, failure in exc.failures.items()})
        except SignalException as exc:
            return 128 + int(exc.sigval)
        finally:
            sys.stdout.flush()
    return 0


def _exit_code(codes: dict[int, int]) -> int:
    """The launcher's exit code from the failed processes' (negative: killed by that signal).

    A process killed by anything but SIGTERM/SIGINT (the OOM killer, ``kill -9``) could not say why,
    so it is named here; otherwise the lowest rank that exited with an error code (it printed its
    error); otherwise ``128 + signal`` of one stopped by the launcher.
    """
    stops = (-signal.SIGTERM, -signal.SIGINT)
    killed = sorted(rank for rank, code in codes.items() if code < 0 and code not in stops)
    if killed:
        code = codes[killed[0]]
        with contextlib.suppress(ValueError):
            print(f"error: process {killed[0]} was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return 128 - code
    said = sorted(rank for rank, code in codes.items() if code > 0)
    if said:
        return codes[said[0]]
    return 128 - codes[min(codes)]
