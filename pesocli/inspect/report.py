"""What ``peso restart-inspect`` prints: rich tables, or one JSON document with ``--json``."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pesocli.inspect.runlog import RunLog
from pesocli.inspect.summary import LOSS_AFTER_STEPS, RestartSummary

SHOWN_SINGULAR_VALUES = 4
"""The drill-down table shows this many top singular values per layer (``--json`` has all)."""


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "–" if value is None else format(value, fmt)


def report_json(
    log: RunLog, summaries: list[RestartSummary], history: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """The ``--json`` document: run status, one summary per event, and the drill-down when asked."""
    doc: dict[str, Any] = {
        "run": str(log.path),
        "method": log.method,
        "complete": log.complete,
        "skipped_partial_lines": log.skipped_lines,
        "layers": len(log.layer_names),
        "loss_after_steps": LOSS_AFTER_STEPS,
        "restarts": [s.to_json() for s in summaries],
    }
    if history is not None:
        doc["layer_records"] = history
    return doc


def print_summary(console: Console, log: RunLog, summaries: list[RestartSummary]) -> None:
    """The per-restart table (or a line saying there are no restart events yet)."""
    status = "finished" if log.complete else "in progress (no final/ yet)"
    console.print(
        f"[bold]{log.path}[/bold]: {log.method or 'unknown method'}, {status}, "
        f"{len(log.layer_names)} layers, {len(summaries)} events"
    )
    if not summaries:
        console.print("no restart or subspace events in restarts.jsonl (methods like lora write none)")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    # the anchor's dropped energy only for runs with a lossy anchor (anchor_keep_energy / anchor_max_rank)
    lossy = any(s.anchor_dropped_max is not None for s in summaries)
    headers = (
        "step",
        "kind",
        "layers",
        "energy\nmin",
        "energy\nmedian",
        "σ1\nmedian",
        "σ1\nmax",
        "angle°\nmedian",
        "angle°\nmax",
        "anchor\nrank",
        *(("anchor\ndropped",) if lossy else ()),
        "seconds",
        "loss\nbefore",
        f"loss\n+{LOSS_AFTER_STEPS}",
    )
    for name in headers:
        table.add_column(name, justify="left" if name == "kind" else "right")
    for s in summaries:
        table.add_row(
            str(s.step),
            s.kind + (" [yellow](partial)[/yellow]" if s.partial else ""),
            str(s.layers),
            _num(s.energy_min, ".3f"),
            _num(s.energy_median, ".3f"),
            _num(s.sigma1_median, ".3g"),
            _num(s.sigma1_max, ".3g"),
            _num(s.angle_median, ".1f"),
            _num(s.angle_max, ".1f"),
            str(s.anchor_rank_max),
            *((_num(s.anchor_dropped_max, ".2e"),) if lossy else ()),
            f"{s.seconds:.2f}",
            _num(s.loss_before, ".4f"),
            _num(s.loss_after, ".4f"),
        )
    console.print(table)
    if log.skipped_lines:
        console.print(
            f"[dim]skipped {log.skipped_lines} incomplete last line(s): the run is being written[/dim]"
        )


def print_layers(console: Console, history: dict[str, list[dict[str, Any]]]) -> None:
    """One table per layer: every event of that layer."""
    for name, records in history.items():
        table = Table(title=name, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        lossy = any(r.get("anchor_dropped_energy") is not None for r in records)
        for column in (
            "step",
            "kind",
            "rank",
            "energy",
            f"top {SHOWN_SINGULAR_VALUES} σ",
            "angle°",
            "anchor rank",
            *(("anchor dropped",) if lossy else ()),
            "seconds",
        ):
            table.add_column(column, justify="right" if column != "kind" else "left")
        for r in records:
            sigmas = r.get("top_singular_values") or []
            table.add_row(
                str(r["step"]),
                str(r.get("kind", "restart")),
                str(r.get("rank", "")),
                _num(r.get("captured_energy"), ".4f"),
                " ".join(format(v, ".3g") for v in sigmas[:SHOWN_SINGULAR_VALUES]) or "–",
                _num(r.get("principal_angle_deg"), ".1f"),
                str(r.get("anchor_rank", "")),
                *((_num(r.get("anchor_dropped_energy"), ".2e"),) if lossy else ()),
                _num(r.get("seconds"), ".3f"),
            )
        console.print(table)
