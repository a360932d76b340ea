"""Fit stacked LoRA pairs to one rank vLLM accepts: zero-pad when it fits (exact), else truncated SVD.

vLLM serves an adapter only when its ``r`` is at most ``--max-lora-rank``, which must be one of
:data:`ALLOWED_RANKS` (``vllm/config/lora.py``). :func:`fit_rank` pads every layer with zeros to
the smallest allowed rank that holds the largest one (exact). When that is above ``max_rank``, each
layer is cut to the largest allowed rank ``<= max_rank`` by an SVD of ``lora_B @ lora_A`` (QR of
both factors + SVD of the small core, never the dense matrix) and the relative Frobenius error
``||Delta W - Delta W_t||_F / ||Delta W||_F`` of every layer is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pesocli.errors import PesoError
from pesocli.export.convert import LoRAPair, pad
from pesocli.linalg import low_rank_svd

ALLOWED_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``vllm/config/lora.py``)."""


@dataclass
class RankFit:
    """Pairs of one uniform rank, and what fitting them cost."""

    pairs: dict[str, LoRAPair]
    rank: int
    """The rank every pair now has (the adapter's ``r``; serve with ``--max-lora-rank`` = this)."""
    exact_rank: int
    """The largest stacked rank before fitting (``R + r`` for an anchor + adapter stack)."""
    errors: dict[str, float] = field(default_factory=dict)
    """Relative Frobenius error per layer of the truncated ones (empty when exact)."""

    @property
    def lossy(self) -> bool:
        return bool(self.errors)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def smallest_allowed_at_least(rank: int) -> int | None:
    """The smallest allowed rank ``>= rank`` (``None`` above 512)."""
    return next((r for r in ALLOWED_RANKS if r >= rank), None)


def largest_allowed_at_most(rank: int) -> int:
    """The largest allowed rank ``<= rank``; raises :class:`PesoError` below 1."""
    fitting = [r for r in ALLOWED_RANKS if r <= rank]
    if not fitting:
        raise PesoError(f"--max-rank must be >= 1 (got {rank})")
    return fitting[-1]


@torch.no_grad()
def truncate(pair: LoRAPair, rank: int) -> tuple[LoRAPair, float]:
    """Best rank-``rank`` approximation of ``lora_B @ lora_A`` (balanced split) and its relative error."""
    u, s, vh = low_rank_svd(pair.lora_B.double(), pair.lora_A.double())
    total = float(s.pow(2).sum())
    error = math.sqrt(float(s[rank:].pow(2).sum()) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    kept = LoRAPair(lora_A=(root[:, None] * vh[:rank]).float(), lora_B=(u[:, :rank] * root).float())
    return pad(kept, rank), error


def fit_rank(pairs: dict[str, LoRAPair], max_rank: int = ALLOWED_RANKS[-1]) -> RankFit:
    """Bring every pair to one allowed rank ``<= max_rank``; exact unless the stack is too wide."""
    exact = max((p.rank for p in pairs.values()), default=1)
    cap = largest_allowed_at_most(max_rank)
    need = smallest_allowed_at_least(max(exact, 1))
    if need is not None and need <= cap:
        return RankFit({name: pad(p, need) for name, p in pairs.items()}, rank=need, exact_rank=exact)
    fitted, errors = {}, {}
    for name, pair in pairs.items():
        if pair.rank <= cap:
            fitted[name] = pad(pair, cap)
        else:
            fitted[name], errors[name] = truncate(pair, cap)
    return RankFit(fitted, rank=cap, exact_rank=exact, errors=errors)
