"""PNG figures of a run's restarts (matplotlib is an optional extra: ``pip install 'peso[plot]'``).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no global backend
state), so this works in threads and without a display.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pesocli.errors import PesoError
from pesocli.inspect.runlog import RunLog

MAX_SPECTRA_PANELS = 12
"""``spectra.png`` shows at most this many events, evenly spread, always with the first and last."""

PLOT_FILES: tuple[str, ...] = (
    "loss.png",
    "spectra.png",
    "captured_energy.png",
    "anchor_rank.png",
    "principal_angle.png",
)
"""What :func:`write_plots` writes (the last three only when the records carry the field)."""

_KIND_COLORS = {"init": "tab:green", "restart": "tab:red"}


def _figure(width: float = 8.0, height: float = 4.5):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PesoError("--plot needs matplotlib, which is not installed: pip install 'peso[plot]'") from exc
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _leaf(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


def _by_step(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(int(record["step"]), []).append(record)
    return dict(sorted(grouped.items()))


def write_plots(log: RunLog, out_dir: str | Path, layers: list[str] | None = None) -> list[Path]:
    """Write the PNGs of :data:`PLOT_FILES` that the run has data for into ``out_dir``; return their paths.

    ``layers`` restricts the per-layer figures (spectra, energy, rank, angle) to those layers.
    """
    _figure()  # fail early, with the install hint, when matplotlib is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(layers) if layers is not None else None
    records = [r for r in log.restarts if wanted is None or r["layer"] in wanted]
    writers = (
        ("loss.png", _loss_figure(log)),
        ("spectra.png", _spectra_figure(records)),
        (
            "captured_energy.png",
            _field_figure(
                records,
                "captured_energy",
                "captured gradient energy",
                "captured energy of the new subspace (fraction of ||G||²)",
            ),
        ),
        (
            "anchor_rank.png",
            _field_figure(
                records,
                "anchor_rank",
                "anchor rank",
                "anchor rank after each event",
                until=max((m["step"] for m in log.metrics), default=None),
            ),
        ),
        (
            "principal_angle.png",
            _field_figure(
                records, "principal_angle_deg", "degrees", "largest principal angle to the previous subspace"
            ),
        ),
    )
    written = []
    for name, fig in writers:
        if fig is None:
            continue
        path = out / name
        fig.savefig(path)
        written.append(path)
    return written


def _loss_figure(log: RunLog):
    fig = _figure()
    ax = fig.add_subplot()
    if log.metrics:
        ax.plot(
            [m["step"] for m in log.metrics],
            [m["loss"] for m in log.metrics],
            lw=1.2,
            color="tab:blue",
            label="train loss",
        )
    if log.evals:
        ax.plot(
            [m["step"] for m in log.evals],
            [m["eval_loss"] for m in log.evals],
            "o-",
            ms=4,
            color="tab:orange",
            label="eval loss",
        )
    seen_kinds: set[str] = set()
    for step, records in _by_step(log.restarts).items():
        kind = str(records[0].get("kind", "restart"))
        label = kind if kind not in seen_kinds else None
        seen_kinds.add(kind)
        ax.axvline(step, color=_KIND_COLORS.get(kind, "tab:purple"), ls="--", lw=0.9, alpha=0.8, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    method = f" ({log.method})" if log.method else ""
    ax.set_title(f"loss with restart markers{method}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def _spectra_figure(records: list[dict[str, Any]]):
    events = {s: rs for s, rs in _by_step(records).items() if any(r.get("top_singular_values") for r in rs)}
    if not events:
        return None
    steps = list(events)
    if len(steps) > MAX_SPECTRA_PANELS:
        picks = {round(i * (len(steps) - 1) / (MAX_SPECTRA_PANELS - 1)) for i in range(MAX_SPECTRA_PANELS)}
        steps = [steps[i] for i in sorted(picks)]
    cols = min(4, len(steps))
    rows = -(-len(steps) // cols)
    fig = _figure(3.2 * cols + 1.5, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False)
    leaves = sorted({_leaf(r["layer"]) for rs in events.values() for r in rs})
    colors = {leaf: f"C{i % 10}" for i, leaf in enumerate(leaves)}
    for ax, step in zip(axes.flat, steps, strict=False):
        for record in events[step]:
            values = record.get("top_singular_values") or []
            if values:
                ax.semilogy(
                    range(1, len(values) + 1), values, color=colors[_leaf(record["layer"])], lw=0.9, alpha=0.7
                )
        ax.set_title(f"step {step} ({events[step][0].get('kind', 'restart')})", fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(steps) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("σ_i of G", fontsize=8)
    handles = [axes.flat[0].plot([], [], color=colors[leaf], label=leaf)[0] for leaf in leaves]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle("top singular values of the full gradient at each restart (one line per layer)")
    return fig


def _field_figure(records: list[dict[str, Any]], key: str, ylabel: str, title: str, until: int | None = None):
    """Per-layer points and the median / min / max over layers per event.

    With ``until`` (the last logged step) the lines are a staircase held to that step: the value
    stays what the last event set (anchor rank).
    """
    points = [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(
        [s for s, _ in points], [v for _, v in points], s=10, alpha=0.35, color="tab:gray", label="one layer"
    )
    per_step: dict[int, list[float]] = {}
    for step, value in points:
        per_step.setdefault(step, []).append(value)
    xs = sorted(per_step)
    style: dict[str, Any] = {}
    if until is not None:
        style = {"drawstyle": "steps-post", "markevery": list(range(len(xs)))}
        if until > xs[-1]:
            per_step[until] = per_step[xs[-1]]
            xs.append(until)
    for reduce, fmt, color, label in (
        (statistics.median, "o-", "tab:blue", "median"),
        (min, "v--", "tab:red", "min"),
        (max, "^--", "tab:green", "max"),
    ):
        ax.plot(
            xs,
            [reduce(per_step[s]) for s in xs],
            fmt,
            color=color,
            ms=4,
            lw=1.5 if label == "median" else 1,
            label=label,
            **style,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
