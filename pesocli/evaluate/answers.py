"""Final answers of generated text (GSM8K convention) and the normaliser exact-match compares with.

The answer of a text is what follows the last ``####`` on its line; without ``####``, the last
number in the text; without a number, the whole text. Both the reference and the prediction go
through the same :func:`extract_answer`, so ``"5 - 1 = 4\\n#### 4"`` and ``"#### 4.0"`` agree.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_MARKER = "####"
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_STRIP_CHARS = " \t\n.$€£%*`\"'"


def normalize_answer(text: str) -> str:
    """Lower-case, trim punctuation and currency, drop thousands separators, canonicalise numbers.

    ``" $1,234.50. "`` -> ``"1234.5"``; ``"4.0"`` -> ``"4"``; ``"-0"`` -> ``"0"``; ``"Paris"`` -> ``"paris"``.
    """
    text = " ".join(text.strip().split()).strip(_STRIP_CHARS).lower()
    candidate = text.replace(",", "")
    if _NUMBER.fullmatch(candidate):
        try:
            number = Decimal(candidate)
        except InvalidOperation:
            return text
        if number == 0:
            return "0"
        return format(number.normalize(), "f")
    return text


def extract_answer(text: str) -> str:
    """The normalised final answer of ``text`` (``####`` line, else the last number, else the text)."""
    if _MARKER in text:
        line = text.rsplit(_MARKER, 1)[1].strip().split("\n", 1)[0]
        numbers = _NUMBER.findall(line)
        # "#### 4 apples" -> "4"; "#### $1,200" -> "1200"; "#### Paris" -> "paris"
        return normalize_answer(numbers[0] if numbers else line)
    numbers = _NUMBER.findall(text)
    if numbers:
        return normalize_answer(numbers[-1])
    return normalize_answer(text)


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match of the two extracted answers (an empty answer never matches)."""
    predicted = extract_answer(prediction)
    return bool(predicted) and predicted == extract_answer(reference)
