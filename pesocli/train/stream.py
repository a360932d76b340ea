"""The endless stream of training micro-batches, with a position a checkpoint can hold.

Epoch ``e`` visits the examples in ``epoch_order(n, seed, e)``, ``batch_size`` at a time (the same
batches as :func:`pesocli.data.batches`); the position is ``(epoch, index of the next batch)``.
Resuming at a position costs nothing: no batch before it is collated again.

Under several processes the batches are global, ``world_size x batch_size`` examples, and each
process collates only its share (:func:`pesocli.train.distributed.share`): the position is the
same on every rank, and the processes together see exactly the batches of one process with
``world_size x batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from pesocli.data import DataBundle, collate, epoch_order, num_batches
from pesocli.data.encode import IGNORE
from pesocli.train.distributed import share


class BatchStream:
    """Training micro-batches of ``bundle``, reshuffled every epoch by ``(seed, epoch)``, on ``device``.

    ``batch_size`` is per process; process ``rank`` of ``world_size`` gets its share of each global
    batch of ``world_size x batch_size`` examples.
    """

    def __init__(
        self,
        bundle: DataBundle,
        batch_size: int,
        seed: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_batches(len(bundle.train), self.global_batch)
        self.epoch = 0
        self.index = 0
        self._order = epoch_order(len(bundle.train), seed, 0)

    def next(self) -> dict[str, torch.Tensor] | None:
        """This process's share of the next micro-batch (starting the next epoch when this one is used up).

        ``None`` when the share is empty: a short last batch of an epoch with fewer examples than
        processes (one process: never).
        """
        if self.index >= self.batches_per_epoch:
            self._seek(self.epoch + 1, 0)
        start = self.index * self.global_batch
        chosen = self._order[start : start + self.global_batch]
        mine = [self.bundle.train[i] for i in chosen[share(len(chosen), self.rank, self.world_size)]]
        self.index += 1
        if not mine:
            return None
        batch = collate(mine, self.bundle.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def placeholder(self) -> dict[str, torch.Tensor]:
        """What a process with an empty share runs instead (:func:`placeholder_batch`)."""
        return placeholder_batch(self.bundle.pad_token_id, self.device)

    def _seek(self, epoch: int, index: int) -> None:
        if epoch != self.epoch:
            self._order = epoch_order(len(self.bundle.train), self.seed, epoch)
        self.epoch, self.index = epoch, index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seek(int(state["epoch"]), int(state["index"]))


def placeholder_batch(pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-token batch with no trained token, for a process whose share of a batch is empty.

    Its loss sum and every gradient are exactly zero, and every process still runs the same forward
    and backward passes (FSDP's all-gathers need every rank in every pass).
    """
    return {
        "input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        "labels": torch.full((1, 1), IGNORE, dtype=torch.long, device=device),
        "attention_mask": torch.ones((1, 1), dtype=torch.long, device=device),
    }
