"""``peso eval``: measure a run, an export or a model on eval data (or on lm-eval tasks).

``pesocli.evaluate.runner.run_eval(target, EvalConfig(...))`` resolves the target (:mod:`.targets`),
reads the data (:mod:`.items`; the ``choice`` record format is documented there), runs the metrics
(:mod:`.metrics`) on a backend (:mod:`.backends`: transformers or vLLM) and writes ``eval.json``
and ``predictions.jsonl``. Runs and their exports give the same numbers (tests/test_eval.py).

This package's ``__init__`` imports nothing heavy (no torch): the CLI reads ``EvalConfig`` for
``--help``; import :mod:`.runner` to evaluate.
"""

from pesocli.evaluate.answers import answers_match, extract_answer, normalize_answer
from pesocli.evaluate.config import DEFAULT_METRICS, METRICS, EvalConfig
from pesocli.evaluate.targets import Target, resolve_target, target_hash

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "EvalConfig",
    "Target",
    "answers_match",
    "extract_answer",
    "normalize_answer",
    "resolve_target",
    "target_hash",
]
