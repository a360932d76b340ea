"""Per-run figures, medians over repeats, the printed ratio tables, and the JSON helpers."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from benchlib.side import PEFT


def summarise_run(run: dict, warmup: int, clock: str = "wall") -> dict:
    """Per-run figures on one clock: ``wall`` (perf_counter) or ``cpu`` (process CPU time)."""
    suffix = "_cpu_s" if clock == "cpu" else "_s"
    steps = run["step" + suffix]
    restart = sum(run["restart" + suffix])
    wall_restart = sum(run["restart_s"])
    align_share = sum(run["align_s"]) / wall_restart if wall_restart > 0 else 0.0
    train = sum(steps)
    median = statistics.median(steps[warmup:] if len(steps) > warmup else steps)
    # median step time of each segment between restarts (anchor growth shows up here)
    bounds = [*run["restart_steps"], run["steps"]] if run["restart_steps"] else [0, run["steps"]]
    segments = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = steps[max(lo, warmup) : hi] or steps[lo:hi]
        if chunk:
            segments.append(statistics.median(chunk))
    return {
        "median_step_s": median,
        "mean_step_s": (train + restart) / run["steps"],
        "restart_total_s": restart,
        "restarts": len(run["restart_steps"]),
        "sketch_s": restart * (1 - align_share),
        "svd_align_s": restart * align_share,
        "restart_share": restart / (train + restart),
        "amortised_step_s": median + restart / run["steps"],
        "segment_median_s": segments,
        # in-process: step time after the second restart against before it (an anchor's cost shows here)
        "late_vs_early": statistics.median(segments[1:]) / segments[0] if len(segments) > 1 else 1.0,
        "peak_bytes": run["peak_bytes"],
        "setup_bytes": run.get("setup_bytes", 0),
    }


def aggregate(runs: list[dict]) -> dict:
    """Median over repeats of every per-run summary figure."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["repeats"] = len(runs)
    out["amortised_step_s_all"] = [r["amortised_step_s"] for r in runs]
    out["peak_bytes_all"] = [r["peak_bytes"] for r in runs]
    return out


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.3f}" if b else "-"


def print_table(results: dict[str, dict], wall: dict[str, dict] | None = None) -> str:
    """Ratios of amortised step time against ``lora`` and PEFT's LoRA, with the restart share."""
    lora = results.get("lora")
    peft = results.get(PEFT)
    wall = wall or {}
    head = (
        f"{'method':<34} {'median s':>9} {'amort. s':>9} {'spread':>7} {'x lora':>7} {'x peft':>7} "
        f"{'wall x lora':>11} {'restarts':>8} {'share':>6} {'late/early':>10}"
    )
    lines = [head, "-" * len(head)]
    for spec, r in results.items():
        w, wl = wall.get(spec), wall.get("lora")
        values = r["amortised_step_s_all"]
        spread = (max(values) - min(values)) / 2 / r["amortised_step_s"]
        lines.append(
            f"{spec:<34} {r['median_step_s']:>9.4f} {r['amortised_step_s']:>9.4f} {100 * spread:>6.1f}% "
            f"{ratio(r['amortised_step_s'], lora and lora['amortised_step_s']):>7} "
            f"{ratio(r['amortised_step_s'], peft and peft['amortised_step_s']):>7} "
            f"{ratio(w['amortised_step_s'], wl['amortised_step_s']) if w and wl else '-':>11} "
            f"{r['restarts']:>8.0f} {100 * r['restart_share']:>5.1f}% {r['late_vs_early']:>10.3f}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def memory_figures(results: dict[str, dict], tensor_runs: dict[str, dict] | None) -> dict[str, float]:
    """The primary memory figure per method: live tensor bytes above the weights when measured
    (``--tensor-memory``), else the timing runs' peak (CUDA allocator, or anonymous RSS on CPU)."""
    if tensor_runs:
        return {k: t["tensor_peak_bytes"] - t["weights_bytes"] for k, t in tensor_runs.items()}
    return {k: r["peak_bytes"] for k, r in results.items()}


def print_memory_table(results: dict[str, dict], tensor_runs: dict[str, dict] | None) -> str:
    """Peak memory as ratios against ``lora`` and PEFT's LoRA: live tensor bytes (when measured)
    and the timing runs' own peak (anonymous RSS on CPU, which includes allocator caching and
    Python objects; ``max_memory_allocated`` on CUDA)."""

    def ratios(values: dict[str, float]) -> dict[str, tuple[str, str]]:
        lora, peft = values.get("lora"), values.get(PEFT)
        return {k: (ratio(v, lora), ratio(v, peft)) for k, v in values.items()}

    anon = {k: r["peak_bytes"] for k, r in results.items()}
    tensors = memory_figures(results, tensor_runs) if tensor_runs else {}
    ra, rt = ratios(anon), ratios(tensors)
    head = (
        f"{'method':<34} {'tensors MiB':>11} {'x lora':>7} {'x peft':>7}   "
        f"{'run peak MiB':>12} {'x lora':>7} {'x peft':>7} {'setup MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for spec, r in results.items():
        t = tensors.get(spec)
        tensor_cols = (
            f"{t / 2**20:>11.2f} {rt[spec][0]:>7} {rt[spec][1]:>7}" if t is not None else f"{'-':>27}"
        )
        run_cols = (
            f"{anon[spec] / 2**20:>12.2f} {ra[spec][0]:>7} {ra[spec][1]:>7} {r['setup_bytes'] / 2**20:>9.2f}"
            if any(anon.values())
            else f"{'-':>12} (not measured with --timing interleaved)"
        )
        lines.append(f"{spec:<34} {tensor_cols}   {run_cols}")
    text = "\n".join(lines)
    print()
    print(text)
    return text


def code_fingerprint() -> dict:
    """Git HEAD and a hash of the working tree's ``pesocli/*.py`` (others edit it while we measure)."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in sorted((root / "pesocli").rglob("*.py")):
        digest.update(path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        head = None
    return {"git_head": head, "pesocli_sha256": digest.hexdigest()[:16]}


def rounded(value):
    """Floats to 6 significant digits, recursively (keeps the JSON of per-step timings small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value
