"""What the user sees while training: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
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


class Reporter:
    """Progress for ``total`` optimizer steps. ``quiet`` prints only errors (and nothing here)."""

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
                BarColumn(),
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

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        text = (
            f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s  "
            f"mem {format_bytes(metrics['peak_memory_bytes'])}"
        )
        if metrics.get("next_restart_in") is not None:
            text += f"  restart in {metrics['next_restart_in']}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step + 1, description=text)
        elif not self.quiet and ((step + 1) % self.plain_every == 0 or step + 1 == self.total):
            print(f"step {step + 1}/{self.total}  {text}", flush=True)

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True, file=sys.stdout)

    def summary(self, rows: list[tuple[str, str]]) -> None:
        if self.quiet:
            return
        table = Table(title="peso train", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)
