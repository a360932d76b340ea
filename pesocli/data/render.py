"""Show one example's tokens with masked and trained tokens in different styles (``--dry-run``)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from rich.text import Text

from pesocli.data.encode import IGNORE, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MASKED_STYLE = "dim"
TRAINED_STYLE = "green"


def render_example(example: Example, tokenizer: PreTrainedTokenizerBase) -> Text:
    """The decoded example: masked tokens ``dim``, trained tokens ``green``, special tokens kept.

    Each run of consecutive masked (or trained) tokens is decoded together, so multi-byte
    characters split across tokens still print correctly.
    """
    text = Text()
    pairs = zip(example.input_ids, example.labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        ids = [token for token, _ in run]
        piece = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
    return text
