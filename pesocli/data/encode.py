"""Turn validated records into token ids and labels (``-100`` = not trained), truncate and pack.

Labels are aligned with ``input_ids`` (``labels[i]`` is ``input_ids[i]`` or ``-100``), the Hugging
Face convention: the loss shifts them by one (``logits[:, :-1]`` predicts ``labels[:, 1:]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pesocli.data.records import Record
from pesocli.data.templates import PromptTemplate, fallback_chat_template
from pesocli.errors import DataError

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


def _encode_messages(enc: Encoder, record: Record) -> Pieces:
    messages = record.data["messages"]
    ids = enc.tokenize(render_chat(enc.tokenizer, messages, where=record.where))
    if not enc.mask_prompt:
        return [(ids, True)]
    # Each assistant turn spans from the end of "history + generation prompt" to the end of
    # "history + this turn"; both prefixes must tokenize to a prefix of the whole conversation.
    pieces: Pieces = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = enc.tokenize(render_chat(enc.tokenizer, messages[:i], True, where=record.where))
        end = enc.tokenize(render_chat(enc.tokenizer, messages[: i + 1], where=record.where))
        if ids[: len(start)] != start or ids[: len(end)] != end or len(start) < done:
            raise DataError(
                f"{record.where}: the chat template does not render conversation prefixes consistently, "
                "so assistant turns cannot be located; set data.mask_prompt=false to train on all tokens"
            )
        pieces += [(ids[done : len(start)], False), (ids[len(start) : len(end)], True)]
        done = len(end)
    return [*pieces, (ids[done:], False)]


_ENCODERS = {"text": _encode_text, "alpaca": _encode_alpaca, "messages": _encode_messages}


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    *,
    where: str = "",
) -> str:
    """The conversation as text, with the tokenizer's chat template or ``templates/chat/simple.jinja``."""
    template = None if getattr(tokenizer, "chat_template", None) else fallback_chat_template()
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja errors come in several types; report them as data errors
        raise DataError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e


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
