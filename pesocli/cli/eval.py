"""``peso eval TARGET``: parse options into an ``EvalConfig`` and hand it to ``pesocli.evaluate.runner``."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from pesocli.cli.common import run_command
from pesocli.evaluate.config import BACKENDS, EVAL_FORMATS, METRICS, EvalConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig)}

# (option, EvalConfig field, click type, help); the default shown is the dataclass's.
EVAL_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--data", "data", str, "Eval data: a JSONL/JSON file or folder (None: the shipped arith_eval.jsonl)."),
    (
        "--format",
        "format",
        click.Choice(EVAL_FORMATS),
        "Record format: the five training formats, or choice (question/choices/answer).",
    ),
    (
        "--template",
        "template",
        str,
        "Prompt template for alpaca/choice records (None: the run's, else alpaca).",
    ),
    ("--max-length", "max_length", int, "Cut sequences to this many tokens (and the model's context)."),
    ("--max-new-tokens", "max_new_tokens", int, "Greedy generation length cap (exact-match)."),
    ("--limit", "limit", int, "Use only the first N records."),
    ("--batch-size", "batch_size", int, "Sequences per forward pass / generate call."),
    ("--backend", "backend", click.Choice(BACKENDS), "hf (transformers) or vllm (export/model folders)."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N."),
    (
        "--dtype",
        "dtype",
        click.Choice(["auto", "bf16", "fp32"]),
        "Precision (runs load in their training dtype).",
    ),
    ("--checkpoint", "checkpoint", int, "Evaluate the run's checkpoints/step-STEP instead of final/."),
    ("--base", "base", str, "Base model of an adapter folder (None: its base_model_name_or_path)."),
    ("--num-fewshot", "num_fewshot", int, "Few-shot examples for --tasks (None: each task's default)."),
    (
        "--out",
        "out",
        str,
        "Output folder for eval.json / predictions.jsonl (None: RUN/eval or ./peso-eval/NAME).",
    ),
)


def _options(fn: Any) -> Any:
    for option, name, kind, text in reversed(EVAL_OPTIONS):
        metavar = "STEP" if name == "checkpoint" else None
        shown = "" if _DEFAULTS[name] is None else f" [default: {_DEFAULTS[name]}]"
        fn = click.option(option, name, type=kind, default=None, metavar=metavar, help=text + shown)(fn)
    return fn


def _split(values: tuple[str, ...] | str | None) -> tuple[str, ...]:
    items = (values,) if isinstance(values, str) else (values or ())
    return tuple(part.strip() for value in items for part in value.split(",") if part.strip())


@click.command("eval", context_settings={"max_content_width": 110})
@click.argument("target")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="NAME",
    help=f"{', '.join(METRICS)} (repeat or comma-separate). [default: by data format: alpaca, messages, "
    "sharegpt, prompt-completion -> exact-match + perplexity, text -> perplexity, choice -> choice]",
)
@_options
@click.option(
    "--tasks", help="Comma-separated lm-eval tasks to run on TARGET instead of --data (needs lm-eval)."
)
@click.option(
    "--trust-remote-code", is_flag=True, default=None, help="Allow a model folder's own Python code to run."
)
@click.option("--quiet", is_flag=True, default=None, help="No progress bar.")
@run_command
def eval_command(target: str, metrics: tuple[str, ...], tasks: str | None, **options: Any) -> None:
    """Measure TARGET: a run folder (final/, or --checkpoint STEP), an export folder of any format
    (anchored, adapter, merged), a model folder, a cached Hugging Face id or 'tiny'.

    Metrics: perplexity (prompt masked as in training), exact-match (greedy generation; GSM8K
    '#### answer', else the last number, normalised) and choice (log-likelihood of each option).
    Prints a table and writes eval.json (metric, value, n, config, target hash) and
    predictions.jsonl (prompt, reference, prediction, correct).
    """
    from pesocli.evaluate.runner import run_eval

    given = {name: value for name, value in options.items() if value is not None}
    cfg = EvalConfig(**given, metrics=_split(metrics), tasks=_split(tasks))
    run_eval(target, cfg)
