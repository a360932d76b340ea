"""The three metrics, each a function of an :class:`EvalContext` returning a :class:`MetricResult`.

- ``perplexity``: ``exp(sum NLL / trained tokens)`` over the data encoded as in training (prompt
  tokens masked; the response or completion and its EOS, or each trained assistant turn and its
  end-of-turn marker, scored; same shift): ``exp`` of the token-weighted eval loss ``peso train`` logs.
- ``exact-match``: greedy generation from each prompt; the final answers of the prediction and the
  reference (``#### answer``, else the last number; normalised, see :mod:`.answers`) must be equal.
- ``choice``: each option's summed log-likelihood after the prompt; the highest must be the answer.
  ``choice_norm`` (divided by the option's length in characters, lm-eval's ``acc_norm``) is reported
  beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pesocli.data.templates import PromptTemplate
from pesocli.errors import DataError
from pesocli.evaluate.answers import answers_match, extract_answer
from pesocli.evaluate.backends import Advance
from pesocli.evaluate.items import EvalData, choice_items, perplexity_examples, prompt_items


@dataclass
class EvalContext:
    """Everything a metric needs."""

    backend: Any
    """:class:`~pesocli.evaluate.backends.HFBackend` or ``VLLMBackend``."""
    data: EvalData
    template: PromptTemplate | None
    max_length: int
    """Effective sequence cap (``--max-length`` and the model's context length)."""
    max_new_tokens: int
    progress: Callable[[str, int], Advance]
    """``progress(description, total)`` -> an ``advance(n)`` callback."""


@dataclass
class MetricResult:
    metric: str
    value: float
    n: int
    """Records (or sequences) the value is computed over."""
    details: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)


def perplexity(ctx: EvalContext) -> MetricResult:
    tokenizer = ctx.backend.tokenizer
    examples, dropped = perplexity_examples(ctx.data, tokenizer, ctx.template, ctx.max_length)
    if not examples:
        raise DataError(f"{ctx.data.path}: no record has a scored token within {ctx.max_length} tokens")
    scores = ctx.backend.sequence_nll(examples, ctx.progress("perplexity", len(examples)))
    total_nll = sum(nll for nll, _ in scores)
    tokens = sum(count for _, count in scores)
    loss = total_nll / max(tokens, 1)
    predictions = [
        {"metric": "perplexity", "source": ex.source, "tokens": count, "nll": nll}
        for ex, (nll, count) in zip(examples, scores, strict=True)
    ]
    details = {"loss": loss, "tokens": tokens, "dropped": dropped}
    return MetricResult("perplexity", math.exp(loss), len(examples), details, predictions)


def exact_match(ctx: EvalContext) -> MetricResult:
    tokenizer = ctx.backend.tokenizer
    # Prompts keep their end; they give up room to the answer, but never more than half the context.
    room = max(ctx.max_length // 2, ctx.max_length - ctx.max_new_tokens)
    items = prompt_items(ctx.data, tokenizer, ctx.template, room)
    texts = ctx.backend.generate(
        [it.prompt_ids for it in items], ctx.max_new_tokens, ctx.progress("exact-match", len(items))
    )
    predictions = []
    for item, text in zip(items, texts, strict=True):
        predictions.append(
            {
                "metric": "exact-match",
                "source": item.source,
                "prompt": item.prompt,
                "reference": item.reference,
                "prediction": text,
                "reference_answer": extract_answer(item.reference),
                "predicted_answer": extract_answer(text),
                "correct": answers_match(text, item.reference),
            }
        )
    correct = sum(p["correct"] for p in predictions)
    return MetricResult(
        "exact-match", correct / max(len(items), 1), len(items), {"correct": correct}, predictions
    )


def choice(ctx: EvalContext) -> MetricResult:
    items = choice_items(ctx.data, ctx.backend.tokenizer, ctx.template, ctx.max_length)
    sequences = [seq for item in items for seq in item.sequences()]
    scores = ctx.backend.sequence_nll(sequences, ctx.progress("choice", len(sequences)))
    predictions, position, right, right_norm = [], 0, 0, 0
    for item in items:
        logliks = [-nll for nll, _ in scores[position : position + len(item.choices)]]
        position += len(item.choices)
        normed = [ll / max(len(text), 1) for ll, text in zip(logliks, item.choices, strict=True)]
        best = max(range(len(logliks)), key=logliks.__getitem__)
        best_norm = max(range(len(normed)), key=normed.__getitem__)
        right += best == item.answer
        right_norm += best_norm == item.answer
        predictions.append(
            {
                "metric": "choice",
                "source": item.source,
                "prompt": item.prompt,
                "choices": item.choices,
                "reference": item.answer,
                "prediction": best,
                "correct": best == item.answer,
                "logliks": logliks,
            }
        )
    n = max(len(items), 1)
    return MetricResult("choice", right / n, len(items), {"choice_norm": right_norm / n}, predictions)


METRIC_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "perplexity": (
        ("text", "alpaca", "messages", "sharegpt", "prompt-completion"),
        "text, alpaca, messages, sharegpt or prompt-completion records",
    ),
    "exact-match": (
        ("alpaca", "messages", "sharegpt", "prompt-completion"),
        "prompt/answer records (alpaca, messages, sharegpt or prompt-completion)",
    ),
    "choice": (("choice",), 'choice records ({"question", "choices", "answer"})'),
}
"""The record formats each metric reads, and how an error message names them."""


def check_metric_format(metric: str, data: EvalData) -> None:
    """One-line :class:`DataError` when ``metric`` cannot read records of ``data.format``."""
    formats, needs = METRIC_FORMATS[metric]
    if data.format not in formats:
        raise DataError(f"{data.path}: {metric} needs {needs}, but these are {data.format} records")


METRIC_FUNCTIONS: dict[str, Callable[[EvalContext], MetricResult]] = {
    "perplexity": perplexity,
    "exact-match": exact_match,
    "choice": choice,
}
"""Metric name -> function (the one list; ``EvalConfig`` validates names against ``METRICS``)."""
