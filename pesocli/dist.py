"""Collectives the library needs below the trainer: summing tensors over the processes of a run.

Nothing here knows about runs, configs or the trainer, so :mod:`pesocli.fullgrad` (the sketches of
a restart are summed over the processes) can use it without importing :mod:`pesocli.train`. Every
function is a no-op in one process. :mod:`pesocli.train.distributed` builds the trainer's view of
several processes (``World``, launching, rank 0 writing) on these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from pesocli.errors import PesoError

T = TypeVar("T")

ENV_RANK, ENV_WORLD = "RANK", "WORLD_SIZE"
"""What ``torchrun`` sets in every process it starts (with ``LOCAL_RANK``, read by ``resolve_device``)."""


class ProcessGroupError(PesoError):
    """Another process of a multi-process run failed, or stopped answering for ``train.dist_timeout``."""

    exit_code = 1


def launched_rank() -> int | None:
    """This process's rank when ``torchrun`` (or ``peso train --nproc``) started it, else ``None``."""
    if ENV_RANK in os.environ and ENV_WORLD in os.environ:
        return int(os.environ[ENV_RANK])
    return None


def is_distributed() -> bool:
    """A process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share(count: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s part of ``count`` items split as evenly as possible over ``size`` ranks.

    A full global batch of ``size x b`` items gives every rank ``b`` consecutive items; a short last
    batch gives some ranks one item fewer (none when ``count < size``).
    """
    return slice(count * rank // size, count * (rank + 1) // size)


def flat(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``tensors`` as one FP32 vector on ``device`` (what one all-reduce sums)."""
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])


def unflat(vector: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the parts of ``vector`` (from :func:`flat`) back into ``tensors`` in place."""
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(vector[offset : offset + n].view_as(tensor))
        offset += n


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def collective(what: str, call: Callable[[], T]) -> T:
    """Run one collective; a failure (dead peer, timeout) becomes a one-line :class:`ProcessGroupError`."""
    try:
        return call()
    except RuntimeError as exc:  # gloo and NCCL report a lost peer or a timeout as RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise ProcessGroupError(
            f"process {rank}: {what} failed, another process of the run has stopped ({first_line(exc)}); "
            "its own error says why"
        ) from exc


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over all processes with one flattened all-reduce (no-op in one process).

    The sum is taken in FP32 (the tensors' own dtype is kept). Used for the full-gradient sketches.
    """
    if not tensors or not is_distributed():
        return
    vector = flat(tensors, tensors[0].device)
    collective("the sketch all-reduce", lambda: dist.all_reduce(vector))
    unflat(vector, tensors)
