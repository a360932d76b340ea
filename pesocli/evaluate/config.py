"""The ``peso eval`` settings: one dataclass, validated once (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

METRICS: tuple[str, ...] = ("perplexity", "exact-match", "choice")
"""Metrics ``--metric`` accepts (see :mod:`pesocli.evaluate.metrics`)."""

EVAL_FORMATS: tuple[str, ...] = (
    "auto", "text", "alpaca", "messages", "sharegpt", "prompt-completion", "choice"
)
"""Record formats of the eval data: the five training formats (``pesocli.data.records.RECORD_FORMATS``,
spelt out so this module imports no torch) plus ``choice``."""

BACKENDS: tuple[str, ...] = ("hf", "vllm")

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "alpaca": ("exact-match", "perplexity"),
    "messages": ("exact-match", "perplexity"),
    "sharegpt": ("exact-match", "perplexity"),
    "prompt-completion": ("exact-match", "perplexity"),
    "text": ("perplexity",),
    "choice": ("choice",),
}
"""What runs when ``--metric`` is not given, by the detected format of the data."""


@dataclass(kw_only=True)
class EvalConfig:
    """How to evaluate one target (a run, an export folder or a model)."""

    data: str | None = None
    """Eval data: a JSONL/JSON file or folder. ``None`` is the shipped ``arith_eval.jsonl`` (alpaca,
    200 GSM8K-style records with ``#### answer``)."""
    format: str = "auto"
    """``auto`` (detected from the first record), ``text``, ``alpaca``, ``messages``, ``sharegpt``,
    ``prompt-completion`` (as ``data.format`` reads them) or ``choice`` (``{"question", "choices",
    "answer", "input"?}``)."""
    metrics: tuple[str, ...] = ()
    """Any of ``perplexity``, ``exact-match``, ``choice``; empty picks by format (:data:`DEFAULT_METRICS`)."""
    template: str | None = None
    """Prompt template for alpaca and choice records. ``None``: the run's ``data.template`` for a run
    target, ``alpaca`` otherwise."""
    max_length: int = 2048
    """Sequences are cut to this many tokens (and to the model's context length): perplexity
    examples keep their start, as in training; prompts keep their end."""
    max_new_tokens: int = 256
    """Greedy generation stops at EOS or after this many tokens (exact-match)."""
    limit: int | None = None
    """Use only the first ``limit`` records (``None``: all)."""
    batch_size: int = 16
    """Sequences per forward pass (perplexity, choice) or per ``generate`` call (exact-match)."""
    backend: str = "hf"
    """``hf`` (transformers, + peft for adapter folders) or ``vllm`` (export and model folders only)."""
    device: str = "auto"
    """``auto`` (CUDA when visible), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (a run's training dtype; otherwise BF16 on CUDA and FP32 on CPU), ``bf16`` or ``fp32``."""
    checkpoint: int | None = None
    """Evaluate a run's ``checkpoints/step-NNNNNN`` instead of ``final/`` (run targets only)."""
    base: str | None = None
    """Base model of an adapter folder (default: its ``base_model_name_or_path``)."""
    tasks: tuple[str, ...] = ()
    """lm-eval task names; when given, lm-eval runs them on the target instead of ``data``."""
    num_fewshot: int | None = None
    """Few-shot examples for lm-eval tasks (``None``: each task's default)."""
    out: str | None = None
    """Where ``eval.json`` and ``predictions.jsonl`` go. ``None``: ``RUN/eval`` (``RUN/eval/step-N``
    with a checkpoint) for a run, ``./peso-eval/<name>`` for anything else."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run."""
    quiet: bool = False
    """No progress bar."""

    def validate(self) -> list[str]:
        """One message per bad field (empty when valid)."""
        errors = []
        if self.format not in EVAL_FORMATS:
            errors.append(f"--format must be one of {', '.join(EVAL_FORMATS)} (got {self.format!r})")
        for metric in self.metrics:
            if metric not in METRICS:
                errors.append(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
        if self.backend not in BACKENDS:
            errors.append(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.dtype not in ("auto", "bf16", "fp32"):
            errors.append(f"--dtype must be auto, bf16 or fp32 (got {self.dtype!r})")
        for name in ("max_length", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.limit is not None and self.limit < 1:
            errors.append(f"--limit must be >= 1 (got {self.limit})")
        if self.checkpoint is not None and self.checkpoint < 0:
            errors.append(f"--checkpoint must be a step >= 0 (got {self.checkpoint})")
        if self.tasks and (self.metrics or self.data is not None):
            errors.append("--tasks runs lm-eval tasks instead of --data/--metric: pass one or the other")
        if self.tasks and self.backend != "hf":
            errors.append("--tasks runs through the hf backend (lm-eval's own vllm model is not bridged)")
        return errors
