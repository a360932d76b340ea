"""Turn validated records into token ids and labels (``-100`` = not trained), truncate and pack.

Labels are aligned with ``input_ids`` (``labels[i]`` is ``input_ids[i]`` or ``-100``), the Hugging
Face convention: the loss shifts them by one (``logits[:, :-1]`` predicts ``labels[:, 1:]``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pesocli.data.chat import chat_tokens, conversation, render_chat
from pesocli.data.records import Record
from pesocli.data.templates import PromptTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
"""The label of a token that is not trained (prompt, BOS, padding)."""


@dataclass
class Example:
    """One training sequence: ``input_ids`` and aligned ``labels`` of the same length."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    """Where the (first) record came from, ``file:line``."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    def trained_runs(self) -> list[list[int]]:
        """The token ids of each run of consecutive trained positions, in order."""
        runs = itertools.groupby(zip(self.input_ids, self.labels, strict=True), key=lambda p: p[1] != IGNORE)
        return [[token for token, _ in run] for trained, run in runs if trained]


@dataclass(frozen=True)
class Encoder:
    """Encodes records of one format with one tokenizer (and, for alpaca, one prompt template)."""

    tokenizer: PreTrainedTokenizerBase
    format: str
    template: PromptTemplate | None = None
    mask_prompt: bool = True

    def __call__(self, record: Record) -> Example:
        pieces = _ENCODERS[self.format](self, record)
        ids = [t for piece, _ in pieces for t in piece]
        labels = [t if trained else IGNORE for piece, trained in pieces for t in piece]
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids, labels = [bos, *ids], [IGNORE, *labels]
        if bos is not None:
            labels[0] = IGNORE  # a BOS the template wrote is not trained either
        return Example(input_ids=ids, labels=labels, source=record.where)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]


Pieces = list[tuple[list[int], bool]]
"""Consecutive token runs and whether each is trained."""


def _encode_text(enc: Encoder, record: Record) -> Pieces:
    return [(enc.tokenize(record.data["text"]) + enc.eos(), True)]


def _encode_alpaca(enc: Encoder, record: Record) -> Pieces:
    assert enc.template is not None, "alpaca records need a prompt template"
    data = record.data
    prompt = enc.template.render_prompt(data["instruction"], data.get("input") or "")
    response = enc.template.render_response(data["output"])
    return [(enc.tokenize(prompt), not enc.mask_prompt), (enc.tokenize(response) + enc.eos(), True)]


def _encode_chat(enc: Encoder, record: Record) -> Pieces:
    """``messages``, ``sharegpt`` and conversational ``prompt-completion`` records (see :mod:`.chat`)."""
    conv = conversation(record, enc.format)
    if not enc.mask_prompt:
        return [(enc.tokenize(render_chat(enc.tokenizer, conv.messages, where=record.where)), True)]
    ids, flags = chat_tokens(enc.tokenizer, conv, where=record.where)
    runs = itertools.groupby(zip(ids, flags, strict=True), key=lambda pair: pair[1])
    return [([token for token, _ in run], trained) for trained, run in runs]


def _encode_prompt_completion(enc: Encoder, record: Record) -> Pieces:
    """TRL's ``prompt``/``completion``: two strings are joined as written (prompt masked, completion and
    EOS trained, each tokenized on its own as for alpaca); two lists of turns are a conversation."""
    prompt, completion = record.data["prompt"], record.data["completion"]
    if not isinstance(prompt, str):
        return _encode_chat(enc, record)
    return [(enc.tokenize(prompt), not enc.mask_prompt), (enc.tokenize(completion) + enc.eos(), True)]


_ENCODERS = {
    "text": _encode_text,
    "alpaca": _encode_alpaca,
    "messages": _encode_chat,
    "sharegpt": _encode_chat,
    "prompt-completion": _encode_prompt_completion,
}


def truncate(example: Example, max_length: int) -> tuple[Example, bool]:
    """The first ``max_length`` tokens, and whether anything was cut."""
    if len(example) <= max_length:
        return example, False
    cut = Example(example.input_ids[:max_length], example.labels[:max_length], example.source)
    return cut, True


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate whole examples, in order, into blocks of at most ``max_length`` tokens.

    Examples are never split (each is already at most ``max_length``); labels are kept, so a BOS
    inside a block stays untrained. Attention is not masked between the examples of a block.
    """
    blocks: list[Example] = []
    for ex in examples:
        if blocks and len(blocks[-1]) + len(ex) <= max_length:
            blocks[-1].input_ids.extend(ex.input_ids)
            blocks[-1].labels.extend(ex.labels)
        else:
            blocks.append(Example(list(ex.input_ids), list(ex.labels), ex.source))
    return blocks
