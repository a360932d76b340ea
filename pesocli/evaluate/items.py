"""Eval records -> token sequences, encoded exactly as ``peso train`` encodes them.

Formats: the five training formats (``text``, ``alpaca``, ``messages`` with tool turns,
``sharegpt``, ``prompt-completion``; see ``pesocli.data``), detected and encoded by the data
package itself, and ``choice``, one multiple-choice question per record::

    {"question": "What is 2 + 3?", "choices": ["4", "5", "6"], "answer": 1}
    {"question": "...", "input": "optional context", "choices": ["...", "..."], "answer": "B"}

``answer`` is the 0-based index of the right choice, its letter (``"A"`` is the first), or its
exact text. The prompt is the prompt template applied to ``question`` (as an alpaca
``instruction``) and ``input``; each choice is scored as the template's response
(``{output}`` = the choice), tokenized separately from the prompt as in training.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.data import IGNORE, Encoder, Example, Record, conversation, detect_format, render_chat, truncate
from pesocli.data.records import RECORD_FORMATS, check_record, read_records
from pesocli.data.templates import PromptTemplate
from pesocli.errors import DataError
from pesocli.paths import default_eval_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EvalData:
    """The records of one eval file and their format."""

    path: str
    format: str
    records: list[Record]


@dataclass
class PromptItem:
    """A generation task: the prompt the model continues and the reference answer text."""

    source: str
    prompt: str
    prompt_ids: list[int]
    reference: str


@dataclass
class ChoiceItem:
    """A multiple-choice question: one continuation per choice after a shared context."""

    source: str
    prompt: str
    choices: list[str]
    answer: int
    context_ids: list[int]
    option_ids: list[list[int]]

    def sequences(self) -> list[Example]:
        """``context + option`` per choice, with only the option's tokens as labels."""
        return [
            Example(self.context_ids + ids, [IGNORE] * len(self.context_ids) + ids, self.source)
            for ids in self.option_ids
        ]


def read_eval_data(path: str | None, format: str, limit: int | None) -> EvalData:
    """Read and validate every record (the first ``limit``); detect the format when ``auto``."""
    where = str(path) if path is not None else str(default_eval_data())
    records = read_records(Path(where))
    if format == "auto":
        format = "choice" if "choices" in records[0].data else detect_format(records[0], RECORD_FORMATS)
    if limit is not None:
        records = records[:limit]
    for record in records:
        if format == "choice":
            _check_choice(record)
        else:
            check_record(record, format)
    return EvalData(path=where, format=format, records=records)


def _check_choice(record: Record) -> None:
    data = record.data
    problem = None
    if not isinstance(data.get("question"), str) or not data["question"].strip():
        problem = "missing or empty 'question'"
    elif data.get("input") is not None and not isinstance(data["input"], str):
        problem = "'input' must be a string"
    elif not isinstance(data.get("choices"), list) or len(data["choices"]) < 2:
        problem = "'choices' must be a list of at least 2 strings"
    elif not all(isinstance(c, str) and c.strip() for c in data["choices"]):
        problem = "every choice must be a non-empty string"
    elif "answer" not in data:
        problem = "missing key 'answer'"
    elif choice_index(data["answer"], data["choices"]) is None:
        n = len(data["choices"])
        problem = f"'answer' {data['answer']!r} is not the index, letter or text of one of the {n} choices"
    if problem:
        raise DataError(
            f'{record.where}: {problem} (choice format: {{"question", "choices", "answer", "input"?}})'
        )


def choice_index(answer: Any, choices: list[str]) -> int | None:
    """``answer`` as a 0-based index: an int, a letter (``A`` = 0) or the exact text of a choice."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        letter = answer.strip().upper()
        if len(letter) == 1 and letter in string.ascii_uppercase[: len(choices)]:
            return string.ascii_uppercase.index(letter)
    return None


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int], keep: int) -> list[int]:
    """BOS + ``ids`` as the training encoder writes them, cut from the left to ``keep`` tokens."""
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if len(ids) > keep:
        ids = ([bos] if bos is not None else []) + ids[len(ids) - keep + (bos is not None) :]
    return ids


def perplexity_examples(
    data: EvalData, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate | None, max_length: int
) -> tuple[list[Example], int]:
    """Training-encoded examples (prompt masked) cut to ``max_length``, and how many had no trained token."""
    encoder = Encoder(tokenizer, data.format, template, mask_prompt=True)
    examples = [truncate(encoder(record), max_length)[0] for record in data.records]
    kept = [ex for ex in examples if ex.num_trained > 0]
    return kept, len(examples) - len(kept)


def prompt_items(
    data: EvalData, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate | None, max_prompt: int
) -> list[PromptItem]:
    """Prompts to generate from and the reference answers.

    alpaca: the template's prompt, ``output``. ``prompt-completion`` with two strings: ``prompt``
    as written (training tokenizes it on its own, then the completion), ``completion``. Chat
    records (``messages``, ``sharegpt``, conversational ``prompt-completion``), read through
    :func:`pesocli.data.conversation`: the conversation up to its last trained assistant turn,
    rendered with the generation prompt, and that turn's content.
    """
    items = []
    for record in data.records:
        if data.format == "alpaca":
            assert template is not None
            prompt = template.render_prompt(record.data["instruction"], record.data.get("input") or "")
            reference = record.data["output"]
        elif data.format == "prompt-completion" and isinstance(record.data["prompt"], str):
            prompt, reference = record.data["prompt"], record.data["completion"]
        else:
            conv = conversation(record, data.format)
            last = max(conv.trained)  # validated records have one (an assistant turn with content)
            prompt = render_chat(tokenizer, conv.messages[:last], True, where=record.where)
            reference = conv.messages[last]["content"]
        ids = _with_bos(tokenizer, _tokenize(tokenizer, prompt), max_prompt)
        items.append(PromptItem(record.where, prompt, ids, reference))
    return items


def choice_items(
    data: EvalData, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate | None, max_length: int
) -> list[ChoiceItem]:
    """One :class:`ChoiceItem` per record; the context is cut from the left so every option fits."""
    assert template is not None
    items = []
    for record in data.records:
        d = record.data
        prompt = template.render_prompt(d["question"], d.get("input") or "")
        options = [_tokenize(tokenizer, template.render_response(c)) for c in d["choices"]]
        room = max(1, max_length - max(len(o) for o in options))
        context = _with_bos(tokenizer, _tokenize(tokenizer, prompt), room)
        index = choice_index(d["answer"], d["choices"])
        assert index is not None  # checked when read
        items.append(ChoiceItem(record.where, prompt, list(d["choices"]), index, context, options))
    return items
