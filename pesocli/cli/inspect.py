"""``peso restart-inspect RUN``: per-restart table, per-layer drill-down, JSON and PNGs of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pesocli.cli.common import run_command


@click.command("restart-inspect", context_settings={"max_content_width": 110})
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--layer",
    "pattern",
    metavar="PATTERN",
    help="Drill into the layers matching PATTERN: a substring (q_proj, layers.0.) or a glob (*.mlp.*).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write PNGs to DIR: loss with restart markers, spectra per restart, captured energy, "
    "anchor rank and principal angle over time (needs matplotlib).",
)
@run_command
def restart_inspect(run: Path, pattern: str | None, as_json: bool, plot_dir: Path | None) -> None:
    """What every restart of RUN did: step, layers, captured gradient energy (min / median over layers),
    top singular value, principal angle to the previous subspace, anchor rank, seconds, and the loss
    just before and 10 steps after.

    Works on a finished run and on one still being written, for every method that writes restart or
    subspace events (restarts.jsonl).
    """
    from rich.console import Console

    from pesocli.inspect import (
        layer_history,
        match_layers,
        print_layers,
        print_summary,
        read_run_log,
        report_json,
        summarize,
        write_plots,
    )

    log = read_run_log(run)
    summaries = summarize(log)
    layers = match_layers(log.layer_names, pattern) if pattern is not None else None
    history = layer_history(log, layers) if layers is not None else None
    written = write_plots(log, plot_dir, layers) if plot_dir is not None else []
    if as_json:
        doc = report_json(log, summaries, history)
        if plot_dir is not None:
            doc["plots"] = [str(p) for p in written]
        click.echo(json.dumps(doc, indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect, keep columns whole
        console = Console(width=140)
    print_summary(console, log, summaries)
    if history is not None:
        print_layers(console, history)
    for path in written:
        console.print(f"wrote {path}")
