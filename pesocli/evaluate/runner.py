"""``run_eval``: resolve the target, read the data, load, measure, write ``eval.json``, ``predictions.jsonl``.

Reads top to bottom: validate -> target -> data (fail on a bad file before loading any weights)
-> backend -> metrics (or lm-eval tasks) -> outputs. Everything the user sees goes through
``console`` (tables) and a progress bar on stderr.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pesocli import __version__
from pesocli.errors import ConfigError
from pesocli.evaluate.config import DEFAULT_METRICS, EvalConfig
from pesocli.evaluate.items import EvalData, read_eval_data
from pesocli.evaluate.metrics import METRIC_FUNCTIONS, EvalContext, MetricResult, check_metric_format
from pesocli.evaluate.targets import Target, resolve_target, target_hash
from pesocli.hashing import sha256


@dataclass
class EvalReport:
    """What one ``peso eval`` measured and where it wrote it."""

    target: Target
    results: list[MetricResult]
    out_dir: Path
    document: dict[str, Any]
    """The content of ``eval.json``."""

    def value(self, metric: str) -> float:
        return next(r.value for r in self.results if r.metric == metric)


def default_out_dir(target: Target) -> Path:
    """``RUN/eval`` (``RUN/eval/step-NNNNNN`` for a checkpoint), else ``./peso-eval/<name>``.

    Never inside an export or model folder: a stray file there would change what vLLM loads
    and the export's recorded hashes.
    """
    if target.kind == "run":
        assert target.path is not None
        out = target.path / "eval"
        return out / f"step-{target.checkpoint:06d}" if target.checkpoint is not None else out
    return Path("peso-eval") / target.name


def fresh_out_dir(out: Path) -> Path:
    """``out``, or when it already holds an ``eval.json`` the first free ``out-2``, ``out-3``, ...: an
    eval never overwrites an earlier one."""
    candidate, n = out, 1
    while (candidate / "eval.json").exists():
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    return candidate


def run_eval(spec: str, cfg: EvalConfig, console: Console | None = None) -> EvalReport:
    """Evaluate ``spec`` (a run folder, an export or model folder, or a model id) as ``cfg`` says."""
    started = time.perf_counter()
    console = console or Console()
    errors = cfg.validate()
    if errors:
        raise ConfigError("\n".join(errors))
    target = resolve_target(spec, cfg.checkpoint, cfg.base)
    data: EvalData | None = None
    metrics: tuple[str, ...] = ()
    if cfg.tasks:
        from pesocli.evaluate.lm_eval_bridge import require_lm_eval

        require_lm_eval()
    else:
        data = read_eval_data(cfg.data, cfg.format, cfg.limit)
        metrics = cfg.metrics or DEFAULT_METRICS[data.format]
        for metric in metrics:
            check_metric_format(metric, data)
        if cfg.template is not None:  # a bad name fails here, before any weights are loaded
            from pesocli.data.templates import load_prompt_template

            load_prompt_template(cfg.template)

    backend, step, run_template = _backend(target, cfg)
    where = f"{target.kind} {target.path or target.spec}" + (f" (step {step})" if step is not None else "")
    try:
        template_name = cfg.template or run_template or "alpaca"
        max_length = min(cfg.max_length, backend.context_length or cfg.max_length)
        if data is not None:
            console.print(
                f"[bold]peso eval[/bold] {where}: {', '.join(metrics)} on {len(data.records)} "
                f"{data.format} records of {data.path} ({backend.name} backend)"
            )
        raw_tasks: dict[str, Any] | None = None
        if cfg.tasks:
            from pesocli.evaluate.lm_eval_bridge import run_tasks

            console.print(f"[bold]peso eval[/bold] {where}: lm-eval tasks {', '.join(cfg.tasks)}")
            results, raw_tasks = run_tasks(
                backend.model,
                backend.tokenizer,
                cfg.tasks,
                batch_size=cfg.batch_size,
                limit=cfg.limit,
                num_fewshot=cfg.num_fewshot,
            )
        else:
            assert data is not None
            results = _measure(backend, data, metrics, cfg, template_name, max_length)
    finally:  # vLLM's engine process goes down here, not at interpreter exit (VLLMBackend.close)
        backend.close()

    asked = Path(cfg.out) if cfg.out is not None else default_out_dir(target)
    out_dir = fresh_out_dir(asked)
    if out_dir != asked:
        console.print(f"{asked} holds an earlier eval, kept as it is; this one goes to {out_dir}")
    document = {
        "peso_version": __version__,
        "target": {**target.describe(), "step": step, "hash": target_hash(target)},
        "data": None
        if data is None
        else {
            "path": data.path,
            "format": data.format,
            "records": len(data.records),
            "sha256": sha256(Path(data.path)) if Path(data.path).is_file() else None,
        },
        # as given, with what "auto"/None resolved to
        "config": {
            **asdict(cfg),
            "metrics": list(metrics),
            "template": template_name,
            "max_length": max_length,
        },
        "results": [{"metric": r.metric, "value": r.value, "n": r.n, **r.details} for r in results],
        "seconds": time.perf_counter() - started,
    }
    if raw_tasks is not None:
        document["lm_eval"] = raw_tasks
    _write(out_dir, document, results)
    _print_table(console, results)
    console.print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'predictions.jsonl'}")
    return EvalReport(target, results, out_dir, document)


def _backend(target: Target, cfg: EvalConfig) -> tuple[Any, int | None, str | None]:
    """The backend, the run step (runs only) and the run's prompt template (runs only)."""
    if cfg.backend == "vllm":
        from pesocli.evaluate.backends import VLLMBackend

        return VLLMBackend(target, cfg), None, None
    from pesocli.evaluate.backends import HFBackend
    from pesocli.evaluate.targets import load_target

    loaded = load_target(target, cfg)
    backend = HFBackend(loaded.model, loaded.tokenizer, cfg.batch_size)
    return backend, loaded.step, loaded.template


def _measure(
    backend: Any,
    data: EvalData,
    metrics: tuple[str, ...],
    cfg: EvalConfig,
    template_name: str,
    max_length: int,
) -> list[MetricResult]:
    from pesocli.data.templates import load_prompt_template

    template = load_prompt_template(template_name) if data.format in ("alpaca", "choice") else None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=cfg.quiet,
    ) as progress:

        def track(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        ctx = EvalContext(backend, data, template, max_length, cfg.max_new_tokens, track)
        return [METRIC_FUNCTIONS[name](ctx) for name in metrics]


def _write(out_dir: Path, document: dict[str, Any], results: list[MetricResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    with open(out_dir / "predictions.jsonl", "w") as handle:
        for result in results:
            for prediction in result.predictions:
                handle.write(json.dumps(prediction) + "\n")


def _print_table(console: Console, results: list[MetricResult]) -> None:
    table = Table(title="peso eval", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    table.add_column("details")
    for r in results:
        details = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.details.items()
        )
        table.add_row(r.metric, f"{r.value:.4f}", str(r.n), details)
    console.print(table)
