"""``build_datasets``: config section + tokenizer -> train (and val) examples and their statistics."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pesocli.data.config import DataConfig
from pesocli.data.encode import Encoder, Example, pack, truncate
from pesocli.data.records import Record, load_records
from pesocli.data.templates import load_prompt_template
from pesocli.errors import DataError
from pesocli.paths import default_train_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class DataStats:
    """What ``build_datasets`` read and made (train side, plus the val size)."""

    path: str
    format: str
    records: int
    """Train records used (after ``limit`` and the val split)."""
    examples: int
    """Train examples (blocks when packing)."""
    tokens: int
    trained_tokens: int
    """Tokens whose label is not -100."""
    truncated: int
    """Train records cut to ``max_length``."""
    dropped: int
    """Train records with no trained token left after truncation (not used)."""
    val_records: int = 0

    def summary(self) -> str:
        """One line for the CLI."""
        line = (
            f"{self.records} {self.format} records from {self.path}: {self.examples} examples, "
            f"{self.tokens} tokens ({self.trained_tokens} trained), {self.truncated} truncated"
        )
        if self.dropped:
            line += f", {self.dropped} dropped (nothing trained left)"
        return line + (f"; {self.val_records} val records" if self.val_records else "")


@dataclass
class DataBundle:
    """Everything the trainer needs from the data section."""

    train: list[Example]
    val: list[Example] | None
    stats: DataStats
    pad_token_id: int
    """The tokenizer's pad id (else its EOS id, else 0); padded positions are masked anyway."""


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> DataBundle:
    """Read, validate (all records, before tokenizing), encode, truncate and optionally pack."""
    path = str(cfg.path) if cfg.path is not None else str(default_train_data())
    records, fmt = load_records(path, cfg.format)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    val_records, val_fmt = None, fmt
    if cfg.val_path is not None:
        val_records, val_fmt = load_records(cfg.val_path, cfg.format)
    elif cfg.val_split > 0:
        records, val_records = _split(records, cfg.val_split, seed, path)

    template = load_prompt_template(cfg.template) if "alpaca" in (fmt, val_fmt) else None
    train, truncated, dropped = _encode_all(records, Encoder(tokenizer, fmt, template, cfg.mask_prompt), cfg)
    if not train:
        raise DataError(f"{path}: no record has a trained token left after truncation to {cfg.max_length}")
    if cfg.packing:
        train = pack(train, cfg.max_length)
    val = None
    if val_records is not None:
        val, _, _ = _encode_all(val_records, Encoder(tokenizer, val_fmt, template, cfg.mask_prompt), cfg)
        if not val:
            where = cfg.val_path or path
            raise DataError(f"{where}: no val record has a trained token left after truncation")

    stats = DataStats(
        path=path,
        format=fmt,
        records=len(records),
        examples=len(train),
        tokens=sum(len(ex) for ex in train),
        trained_tokens=sum(ex.num_trained for ex in train),
        truncated=truncated,
        dropped=dropped,
        val_records=len(val_records or []),
    )
    return DataBundle(train=train, val=val, stats=stats, pad_token_id=_pad_id(tokenizer))


def _split(records: list[Record], fraction: float, seed: int, path: str) -> tuple[list[Record], list[Record]]:
    """Hold out ``round(fraction * n)`` (at least 1) records chosen by ``seed``; both keep file order."""
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"{path}: data.val_split={fraction} leaves no train records ({len(records)} records)")
    held = set(random.Random(f"peso-val:{seed}").sample(range(len(records)), n_val))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _encode_all(records: list[Record], encoder: Encoder, cfg: DataConfig) -> tuple[list[Example], int, int]:
    """Encoded examples (those with a trained token left), the truncated count, the dropped count."""
    examples, truncated, dropped = [], 0, 0
    for record in records:
        example, was_cut = truncate(encoder(record), cfg.max_length)
        truncated += was_cut
        if example.num_trained == 0:
            dropped += 1
        else:
            examples.append(example)
    return examples, truncated, dropped


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
