"""Summaries of restart events: one row per restart (over layers) and one row per layer (drill-down).

Works for every method that writes ``RestartRecord`` lines (``peso-r`` restarts, ``lora-one`` and
``peso-t`` inits, subspace events of other methods): only the shared fields are read, and a field
a method leaves empty (``principal_angle_deg`` at an init) stays empty in the summary.

Steps: a restart's ``step`` is the 1-based optimizer step it ran *before* (as read by
:func:`~pesocli.inspect.runlog.read_run_log`, whatever the file's version); a metrics record's
``step`` is the number of optimizer steps completed. So the loss "just before" restart ``t`` is the
last logged loss with ``step <= t - 1`` and the loss "10 steps after" is the first logged loss with
``step >= t - 1 + 10``.
"""

from __future__ import annotations

import fnmatch
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from pesocli.errors import PesoError
from pesocli.inspect.runlog import RunLog

LOSS_AFTER_STEPS = 10
"""The "loss after" column reads the loss this many optimizer steps after the restart."""


@dataclass
class RestartSummary:
    """One restart (or subspace) event, summarised over its layers."""

    step: int
    """1-based optimizer step the event ran before (1: before the first step)."""
    kind: str
    """``init``, ``restart`` or a method's own event name (joined with ``+`` if several)."""
    method: str
    layers: int
    energy_min: float | None
    """Smallest captured gradient energy of the new subspace over layers (fraction of ``||G||_F^2``)."""
    energy_median: float | None
    sigma1_median: float | None
    """Median over layers of the top singular value of the (sketched) full gradient."""
    sigma1_max: float | None
    angle_median: float | None
    """Median over layers of the largest principal angle to the previous subspace (degrees)."""
    angle_max: float | None
    anchor_rank_max: int
    """Largest anchor rank over layers after the event."""
    anchor_dropped_max: float | None
    """Largest fraction of a layer's anchor energy that lossy truncation dropped at the event
    (``method.anchor_keep_energy`` / ``anchor_max_rank``); ``None`` when the anchors are exact."""
    seconds: float
    """Wall time of the whole event (``seconds_total``; else the sum of per-layer seconds)."""
    loss_before: float | None
    loss_before_step: int | None
    loss_after: float | None
    loss_after_step: int | None
    partial: bool = False
    """Fewer layers than the other events: the run is writing this event right now."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _loss_at(log: RunLog, step: int, *, before: bool) -> tuple[float | None, int | None]:
    if before:
        found = [m for m in log.metrics if m["step"] <= step]
        pick = max(found, key=lambda m: m["step"]) if found else None
    else:
        found = [m for m in log.metrics if m["step"] >= step]
        pick = min(found, key=lambda m: m["step"]) if found else None
    return (float(pick["loss"]), int(pick["step"])) if pick else (None, None)


def summarize(log: RunLog) -> list[RestartSummary]:
    """One :class:`RestartSummary` per event step, in step order."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in log.restarts:
        by_step.setdefault(int(record["step"]), []).append(record)
    widest = max((len(records) for records in by_step.values()), default=0)
    summaries = []
    for step in sorted(by_step):
        records = by_step[step]
        energies = [r["captured_energy"] for r in records if r.get("captured_energy") is not None]
        sigma1 = [r["top_singular_values"][0] for r in records if r.get("top_singular_values")]
        angles = [r["principal_angle_deg"] for r in records if r.get("principal_angle_deg") is not None]
        dropped = [r["anchor_dropped_energy"] for r in records if r.get("anchor_dropped_energy") is not None]
        totals = [r["seconds_total"] for r in records if r.get("seconds_total") is not None]
        seconds = max(totals) if totals else sum(float(r.get("seconds") or 0.0) for r in records)
        loss_before, before_step = _loss_at(log, step - 1, before=True)
        loss_after, after_step = _loss_at(log, step - 1 + LOSS_AFTER_STEPS, before=False)
        summaries.append(
            RestartSummary(
                step=step,
                kind="+".join(dict.fromkeys(str(r.get("kind", "restart")) for r in records)),
                method=str(records[0].get("method", "?")),
                layers=len({r["layer"] for r in records}),
                energy_min=min(energies) if energies else None,
                energy_median=_median(energies),
                sigma1_median=_median(sigma1),
                sigma1_max=max(sigma1) if sigma1 else None,
                angle_median=_median(angles),
                angle_max=max(angles) if angles else None,
                anchor_rank_max=max(int(r.get("anchor_rank") or 0) for r in records),
                anchor_dropped_max=max(dropped) if dropped else None,
                seconds=seconds,
                loss_before=loss_before,
                loss_before_step=before_step,
                loss_after=loss_after,
                loss_after_step=after_step,
                partial=len(records) < widest,
            )
        )
    return summaries


def match_layers(names: list[str], pattern: str) -> list[str]:
    """Layers whose name matches ``pattern``: a glob when it has ``*?[``, else a substring.

    ``q_proj`` matches every query projection, ``layers.0.`` every projection of block 0,
    ``*.mlp.*`` every MLP projection. Raises :class:`PesoError` (with a few names) when none match.
    """
    if any(ch in pattern for ch in "*?["):
        chosen = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    else:
        chosen = [n for n in names if pattern in n]
    if not chosen:
        examples = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise PesoError(f"--layer {pattern!r} matches no layer with restart records ({examples or 'none'})")
    return chosen


def layer_history(log: RunLog, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The restart records of each named layer, in step order."""
    wanted = set(names)
    history: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for record in sorted(log.restarts, key=lambda r: int(r["step"])):
        if record["layer"] in wanted:
            history[record["layer"]].append(record)
    return history
