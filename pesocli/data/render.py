"""Show one example's tokens, masked and trained, for ``--dry-run``.

On a colour terminal masked tokens are ``dim`` and trained ones ``green``; where colour does not
show (stdout piped or redirected, ``--no-color``, ``NO_COLOR`` set) masked runs are wrapped in
visible ``[masked]...[/masked]`` markers instead.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from rich.text import Text

from pesocli.data.encode import IGNORE, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MASKED_STYLE = "dim"
TRAINED_STYLE = "green"
MASK_OPEN, MASK_CLOSE = "[masked]", "[/masked]"


def render_example(example: Example, tokenizer: PreTrainedTokenizerBase, *, markers: bool = False) -> Text:
    """The decoded example, special tokens kept: masked tokens ``dim`` and trained tokens ``green``,
    or (``markers=True``) unstyled with each masked run between ``[masked]`` and ``[/masked]``.

    Each run of consecutive masked (or trained) tokens is decoded together, so multi-byte
    characters split across tokens still print correctly.
    """
    text = Text()
    pairs = zip(example.input_ids, example.labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        ids = [token for token, _ in run]
        piece = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if markers:
            text.append(piece if trained else f"{MASK_OPEN}{piece}{MASK_CLOSE}")
        else:
            text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
    return text


def example_preview(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, markers: bool = False
) -> tuple[Text, Text]:
    """The ``--dry-run`` heading (where the example is from, trained / total tokens, the legend) and
    the example itself (:func:`render_example`)."""
    heading = Text("first example", style="bold")
    heading.append(f" ({example.source}; {example.num_trained} / {len(example)} tokens trained; ", style=None)
    if markers:
        heading.append(f"{MASK_OPEN}masked{MASK_CLOSE} / trained):")
    else:
        heading.append("masked", style=MASKED_STYLE).append(" / ").append("trained", style=TRAINED_STYLE)
        heading.append("):")
    return heading, render_example(example, tokenizer, markers=markers)
