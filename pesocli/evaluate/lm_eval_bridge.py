"""``peso eval TARGET --tasks a,b``: run lm-eval tasks on the loaded target through lm-eval's model API.

The target is loaded by peso (a run with its anchors and adapters, an export with its adapter) and
handed to lm-eval's ``HFLM`` as a ready model object, so lm-eval never reloads weights by name.
lm-eval reads its task data itself (from its own cache when offline).
"""

from __future__ import annotations

from typing import Any

from pesocli.errors import PesoError
from pesocli.evaluate.metrics import MetricResult


def require_lm_eval() -> None:
    """Fail early, in one line, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise PesoError("--tasks needs lm-eval, which is not installed: pip install lm-eval") from exc


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: tuple[str, ...],
    *,
    batch_size: int,
    limit: int | None,
    num_fewshot: int | None,
) -> tuple[list[MetricResult], dict[str, Any]]:
    """One :class:`MetricResult` per task and metric (``task/metric``), and lm-eval's raw ``results``."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    except (KeyError, ValueError, FileNotFoundError) as exc:  # unknown task, data not in the cache
        raise PesoError(f"lm-eval could not run {', '.join(tasks)}: {exc}") from exc
    raw = output.get("results", {}) if output else {}
    samples = output.get("n-samples", {}) if output else {}
    results = []
    for task, metrics in raw.items():
        n = int(samples.get(task, {}).get("effective", 0) or 0)
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                results.append(MetricResult(f"{task}/{name}", float(value), n))
    return results, raw
