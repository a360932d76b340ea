"""The endless stream of training micro-batches, with a position a checkpoint can hold.

Epoch ``e`` visits the examples in ``epoch_order(n, seed, e)``, ``batch_size`` at a time (the same
batches as :func:`pesocli.data.batches`); the position is ``(epoch, index of the next batch)``.
Resuming at a position costs nothing: no batch before it is collated again.
"""

from __future__ import annotations

from typing import Any

import torch

from pesocli.data import DataBundle, collate, epoch_order, num_batches


class BatchStream:
    """Training micro-batches of ``bundle``, reshuffled every epoch by ``(seed, epoch)``, on ``device``."""

    def __init__(self, bundle: DataBundle, batch_size: int, seed: int, device: torch.device) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.batches_per_epoch = num_batches(len(bundle.train), batch_size)
        self.epoch = 0
        self.index = 0
        self._order = epoch_order(len(bundle.train), seed, 0)

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch (starting the next epoch when this one is used up)."""
        if self.index >= self.batches_per_epoch:
            self._seek(self.epoch + 1, 0)
        start = self.index * self.batch_size
        chosen = [self.bundle.train[i] for i in self._order[start : start + self.batch_size]]
        self.index += 1
        batch = collate(chosen, self.bundle.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _seek(self, epoch: int, index: int) -> None:
        if epoch != self.epoch:
            self._order = epoch_order(len(self.bundle.train), self.seed, epoch)
        self.epoch, self.index = epoch, index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seek(int(state["epoch"]), int(state["index"]))
