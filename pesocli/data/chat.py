"""Chat records -> token ids with the assistant turns marked, under any chat template.

The conversation is rendered once with the tokenizer's chat template (or the fallback
``templates/chat/simple.jinja``) and tokenized once; which tokens are trained is decided by
*characters*, never by comparing token prefixes of partial renderings (those break when a
template renders a prefix differently, e.g. Mistral v0.3 folding the system message into the
last user turn, or when a generation prompt ending in a space tokenizes differently once the
answer follows it):

1. Templates with ``{% generation %}`` blocks: the blocks are the trained text
   (``apply_chat_template(..., return_assistant_tokens_mask=True)``).
2. Otherwise each trained assistant turn's content is located in the rendered text, in order,
   after the previous turn (as written, or stripped for templates that ``| trim`` it), together
   with the end-of-turn text the template writes after it (``<|im_end|>``, ``<|eot_id|>``,
   ``</s>``, ...: what follows the content both when the turn ends the conversation and when a
   user turn follows, trailing whitespace dropped unless that is all there is). System turns are
   not used as anchors: templates move them (into the first or last user turn) or drop them.

Character spans become token flags through the fast tokenizer's offset mapping: a token is
trained when its characters overlap a span (so a token that fuses the template's space with the
first word of the answer, ``▁answer``, is trained; it is what the model generates there).
Slow (Python/SentencePiece-backend) tokenizers have no offset mapping: masking chat turns with
one is refused with a one-line :class:`DataError` (no silent fallback); ``data.mask_prompt=false``
trains on every token instead. ``AutoTokenizer`` loads the fast class whenever a folder has a
``tokenizer.json`` or a convertible SentencePiece model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pesocli.data.records import SHAREGPT_ROLES, Record
from pesocli.data.templates import fallback_chat_template
from pesocli.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHAT_FORMATS = ("messages", "sharegpt", "prompt-completion")
"""Record formats that become a conversation (``prompt-completion`` only with lists of turns)."""

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Conversation:
    """The turns handed to the chat template and which of them are trained."""

    messages: list[dict[str, Any]]
    """``{"role", "content", ...}`` dicts as the template receives them (``name``, ``tool_calls`` kept)."""
    trained: frozenset[int]
    """Indices of the assistant turns to train (all with content; a completion's only, for TRL records)."""


def conversation(record: Record, format: str) -> Conversation:
    """A validated ``messages``, ``sharegpt`` or conversational ``prompt-completion`` record as turns."""
    data = record.data
    if format == "sharegpt":
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in data["conversations"]]
        first_trained = 0
    elif format == "prompt-completion":
        messages = [*data["prompt"], *data["completion"]]
        first_trained = len(data["prompt"])  # TRL trains on the completion only
    else:
        messages = data["messages"]
        first_trained = 0
    trained = (i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("content"))
    return Conversation(messages=messages, trained=frozenset(i for i in trained if i >= first_trained))


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    *,
    where: str = "",
) -> str:
    """The conversation as text, with the tokenizer's chat template or ``templates/chat/simple.jinja``."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=_template_override(tokenizer), tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja errors come in several types; report them as data errors
        raise DataError(f"{where}: the chat template failed: {type(e).__name__}: {_first_line(e)}") from e


def chat_tokens(
    tokenizer: PreTrainedTokenizerBase, conv: Conversation, *, where: str
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained.

    Needs a fast tokenizer (offset mapping); a slow one raises a one-line :class:`DataError` naming
    the record (no fallback: tokenizing turns separately would train on ids inference never sees).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{where}: training only on assistant turns needs a fast tokenizer (its offset mapping locates "
            f"the turns); {type(tokenizer).__name__} is a slow one: use a model folder with tokenizer.json, "
            "or set data.mask_prompt=false to train on every token"
        )
    if _GENERATION_BLOCK.search(_active_template(tokenizer)):
        return _generation_block_tokens(tokenizer, conv, where)
    text = render_chat(tokenizer, conv.messages, where=where)
    return token_flags(tokenizer, text, assistant_spans(tokenizer, conv, text, where=where))


def token_flags(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Tokenize ``text`` (no special tokens added) and flag each token overlapping a ``[start, end)`` span.

    A token with an empty offset range (whitespace a byte-level tokenizer trimmed) is flagged by
    its position: trained when it sits strictly inside a span.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = []
    for start, end in enc["offset_mapping"]:
        if end > start:
            flags.append(any(start < e and end > s for s, e in spans))
        else:
            flags.append(any(s < start < e for s, e in spans))
    return list(enc["input_ids"]), flags


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, conv: Conversation, text: str, *, where: str
) -> list[tuple[int, int]]:
    """``[start, end)`` character spans in ``text`` of each trained turn's content plus its end-of-turn text.

    Raises a one-line :class:`DataError` naming the record and the turn when an assistant content
    cannot be found after the previous turn.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, message in enumerate(conv.messages):
        content = message.get("content")
        if not isinstance(content, str) or not content or message["role"] == "system":
            continue  # system turns move (folded into a user turn) or vanish; tool calls have no text
        if message["role"] != "assistant":
            found = _find(text, content, pos, "")
            pos = found[1] if found else pos  # a user turn the template rewrote is no anchor
            continue
        end_of_turn = _end_of_turn(tokenizer, conv.messages[: i + 1], where)
        found = _find(text, content, pos, end_of_turn)
        if found is None and i not in conv.trained:
            continue  # a prompt's assistant turn (TRL records) is context; it need not be located
        if found is None:
            raise DataError(
                f"{where}: the content of turn {i} (assistant) does not appear in the conversation the chat "
                "template renders, after the previous turn, so it cannot be trained; set "
                "data.mask_prompt=false to train on every token"
            )
        start, end = found
        end += _common_prefix(end_of_turn, text[end : end + len(end_of_turn)])
        if i in conv.trained:
            spans.append((start, end))
        pos = end
    return spans


def _find(text: str, content: str, pos: int, end_of_turn: str) -> tuple[int, int] | None:
    """The first occurrence of ``content`` (else of it stripped) at or after ``pos``, preferring one
    followed by ``end_of_turn`` (so a one-character answer is not matched inside a role header)."""
    for needle in dict.fromkeys((content, content.strip())):
        if not needle:
            continue
        first = text.find(needle, pos)
        at = first
        while end_of_turn and at != -1 and not text.startswith(end_of_turn, at + len(needle)):
            at = text.find(needle, at + 1)
        at = at if at != -1 else first
        if at != -1:
            return at, at + len(needle)
    return None


_PROBE = "peso-probe-of-the-turn"
"""Stands in for a turn's content to read the text a template writes after it (any content would be
ambiguous: a one-letter answer also occurs inside the markers)."""


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str) -> str:
    """What the template writes after the last turn's content to end that turn.

    The common start, in whole tokens, of what follows the turn when it ends the conversation and
    when a user turn follows it (so an end-of-conversation ``eos_token``, as Phi-3 writes, is not
    part of it). Trailing whitespace after a marker is dropped (``<|im_end|>\n`` -> ``<|im_end|>``:
    the model stops at the marker); a template that ends a turn with whitespace only keeps it.
    """
    probed = [*messages[:-1], {**messages[-1], "content": _PROBE}]
    ending = _after_probe(render_chat(tokenizer, probed, where=where))
    try:
        followed = tokenizer.apply_chat_template(
            [*probed, {"role": "user", "content": "?"}], chat_template=_template_override(tokenizer),
            tokenize=False,
        )
    except Exception:  # a template that refuses the extra turn: the conversation's end must do
        followed = None
    if followed is not None and _PROBE in followed:
        ending = ending[: _common_token_prefix(tokenizer, ending, _after_probe(followed))]
    return ending.rstrip() or ending


def _after_probe(text: str) -> str:
    at = text.rfind(_PROBE)
    return text[at + len(_PROBE) :] if at != -1 else ""


def _common_token_prefix(tokenizer: PreTrainedTokenizerBase, a: str, b: str) -> int:
    """Characters of ``a`` covered by the tokens ``a`` and ``b`` start with in common."""
    enc_a = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
    end = 0
    for id_a, id_b, (_, stop) in zip(enc_a["input_ids"], ids_b, enc_a["offset_mapping"], strict=False):
        if id_a != id_b:
            break
        end = max(end, stop)
    return end


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _generation_block_tokens(
    tokenizer: PreTrainedTokenizerBase, conv: Conversation, where: str
) -> tuple[list[int], list[bool]]:
    """Tokens and flags from the template's ``{% generation %}`` blocks (one block per assistant turn)."""
    try:
        out = tokenizer.apply_chat_template(
            conv.messages, chat_template=_template_override(tokenizer), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
    except Exception as e:
        raise DataError(f"{where}: the chat template failed: {type(e).__name__}: {_first_line(e)}") from e
    ids, flags = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    assistants = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant" and m.get("content")]
    if len(conv.trained) == len(assistants):
        return ids, flags
    runs = _runs(flags)  # a TRL completion: keep the blocks of the completion's turns only
    if len(runs) != len(assistants):
        raise DataError(
            f"{where}: the chat template's {{% generation %}} blocks ({len(runs)}) do not match the "
            f"{len(assistants)} assistant turns, so the completion's turns cannot be told apart"
        )
    for (start, end), turn in zip(runs, assistants, strict=True):
        if turn not in conv.trained:
            flags[start:end] = [False] * (end - start)
    return ids, flags


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of consecutive ``True`` flags."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and (not runs or runs[-1][1] != i):
            runs.append((i, i + 1))
        elif flag:
            runs[-1] = (runs[-1][0], i + 1)
    return runs


def _template_override(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """``None`` (the tokenizer's own template) or the fallback template for a tokenizer without one."""
    return None if getattr(tokenizer, "chat_template", None) else fallback_chat_template()


def _active_template(tokenizer: PreTrainedTokenizerBase) -> str:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: apply_chat_template uses "default"
        own = own.get("default", "")
    return own or fallback_chat_template()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""
