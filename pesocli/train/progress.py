"""What the user sees while training: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024:
            return f"{num:.0f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


EPOCHS_WARNING = 4.0
"""A plan of more passes over the training data than this gets a one-line warning."""


def describe_plan(steps: int, sequences_per_step: int, examples: int, tokens: int) -> tuple[str, str | None]:
    """The start-of-run line on how much training the plan is, and a warning when it is many epochs.

    ``sequences_per_step``: the global batch (processes x batch size x grad accum); ``examples`` and
    ``tokens``: one pass over the training examples. Returns ``(line, warning or None)``.
    """
    sequences = steps * sequences_per_step
    epochs = sequences / max(examples, 1)
    line = (
        f"plan: {steps:,} steps x {sequences_per_step} sequences = {epochs:,.2f} epochs over "
        f"{examples:,} examples, about {epochs * tokens:,.0f} tokens"
    )
    warning = None
    if epochs > EPOCHS_WARNING:
        warning = (
            f"the plan is {epochs:,.1f} passes over {examples:,} training examples (more than "
            f"{EPOCHS_WARNING:g}); set --epochs or --max-steps, or give more data"
        )
    return line, warning


BAR_WIDTH = 20
"""Width of the bar itself; at 80 columns what is left goes to step/total, elapsed, ETA and the fields."""


def fit_fields(fields: list[str], width: int) -> str:
    """``fields`` (most important first) joined by two spaces, dropping from the end what does not fit."""
    kept: list[str] = []
    for text in fields:
        if len("  ".join([*kept, text])) > width:
            break
        kept.append(text)
    return "  ".join(kept)


class Reporter:
    """Progress for ``total`` optimizer steps. ``quiet`` prints only errors (and nothing here).

    On a terminal: one bar line ``train ━━━ 12/300 0:00:03 0:01:10 loss 1.23  restart in 88  lr ...``
    whose step/total, elapsed time and ETA stay at any width (the secondary fields are dropped first),
    with :meth:`note` lines (restarts, evals, warnings) printed above it. Otherwise plain lines.
    """

    def __init__(self, total: int, *, quiet: bool = False, console: Console | None = None) -> None:
        self.total = total
        self.quiet = quiet
        self.console = console or Console(stderr=False)
        self.interactive = self.console.is_terminal and not quiet
        self.plain_every = max(1, total // 20)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> Reporter:
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=BAR_WIDTH),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _fields_width(self) -> int:
        """Columns left for the fields after ``train``, the bar, ``N/N``, elapsed and ETA (and gaps)."""
        fixed = len("train") + BAR_WIDTH + 2 * len(str(self.total)) + 1 + 2 * len("0:00:00") + 5
        return max(0, self.console.width - fixed - 1)

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        fields = [f"loss {metrics['loss']:.4f}"]
        if metrics.get("next_restart_in") is not None:
            fields.append(f"restart in {metrics['next_restart_in']}")
        fields += [
            f"lr {metrics['lr']:.2e}",
            f"{metrics['tokens_per_s']:.0f} tok/s",
            f"mem {format_bytes(metrics['peak_memory_bytes'])}",
        ]
        if self._progress is not None:
            text = fit_fields(fields, self._fields_width())
            self._progress.update(self._task, completed=step + 1, description=text)
        elif not self.quiet and ((step + 1) % self.plain_every == 0 or step + 1 == self.total):
            print(f"step {step + 1}/{self.total}  {'  '.join(fields)}", flush=True)

    def restart(self, step: int, layers: int, seconds: float, energy: float | None,
                loss_before: float | None) -> None:
        """One line per restart: the 1-based step it ran before, layers, time, energy, last loss."""
        parts = [f"restart before step {step}: {layers} layers, {seconds:.2f} s"]
        if energy is not None:
            parts.append(f"captured energy (median) {energy:.3f}")
        if loss_before is not None:
            parts.append(f"loss before {loss_before:.4f}")
        self.note(", ".join(parts))

    def evaluation(self, step: int, loss: float) -> None:
        """One line per validation pass."""
        self.note(f"step {step}: eval loss {loss:.4f}")

    def note(self, message: str) -> None:
        if self.quiet:
            return
        # above the bar while it runs; never wrapped (a log file keeps one line per note), no markup
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def summary(self, rows: list[tuple[str, str]]) -> None:
        if self.quiet:
            return
        table = Table(title="peso train", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", overflow="fold")  # paths wrap whole, never cut to "..."

        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)
