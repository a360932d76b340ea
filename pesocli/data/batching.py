"""Seeded, deterministic mini-batches of examples (right padding)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from pesocli.data.encode import IGNORE, Example


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch: nothing is dropped, the last batch may be smaller."""
    return -(-n_examples // batch_size)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch; a pure function of ``(seed, epoch)``."""
    order = list(range(n_examples))
    random.Random(f"peso-data:{seed}:{epoch}").shuffle(order)
    return order


def batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    pad_token_id: int,
    shuffle: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``input_ids``, ``labels``, ``attention_mask``, each ``(b, longest)`` int64.

    The order is shuffled by ``(seed, epoch)`` (or kept, with ``shuffle=False``, for eval), so a
    resumed run can skip the batches it has already seen with ``itertools.islice``.
    """
    order = epoch_order(len(examples), seed, epoch) if shuffle else list(range(len(examples)))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pads get ``pad_token_id``, label -100 and mask 0."""
    width = max(len(ex) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex)] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, : len(ex)] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, : len(ex)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
