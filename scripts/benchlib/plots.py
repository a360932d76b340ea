"""The step-time / memory figure of ``bench_methods.py``."""

from __future__ import annotations

import statistics

from benchlib.summary import memory_figures


def plot(
    results: dict[str, dict],
    runs: dict[str, list[dict]],
    path: str,
    title: str,
    clock: str,
    tensor_runs: dict[str, dict] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for spec, spec_runs in runs.items():
        key = "step_cpu_s" if clock == "cpu" else "step_s"
        steps = [statistics.median(col) for col in zip(*(r[key] for r in spec_runs), strict=True)]
        window = 9
        smooth = [
            statistics.median(steps[max(0, i - window // 2) : i + window // 2 + 1]) for i in range(len(steps))
        ]
        (line,) = left.plot(range(len(smooth)), [1000 * s for s in smooth], label=spec, lw=1.1)
        for step in spec_runs[0]["restart_steps"]:
            left.axvline(step, color=line.get_color(), ls=":", lw=0.8, alpha=0.6)
    left.set_xlabel("step")
    left.set_ylabel(f"training step, {clock} ms")
    left.set_title("step time: median of repeats, 9-step running median (dotted: restarts)", fontsize=9)
    left.legend(fontsize=6, ncol=2, loc="upper left", framealpha=0.6)
    names = list(results)
    memory = memory_figures(results, tensor_runs)
    lora = results.get("lora", {}).get("amortised_step_s")
    base = [results[n]["median_step_s"] / lora for n in names] if lora else []
    extra = (
        [(results[n]["amortised_step_s"] - results[n]["median_step_s"]) / lora for n in names] if lora else []
    )
    if lora:
        xs = range(len(names))
        right.bar(xs, base, label="training step")
        right.bar(xs, extra, bottom=base, label="restarts (amortised)")
        right.axhline(1.02, color="k", ls="--", lw=0.8, label="1.02 x lora (target)")
        for x, n in zip(xs, names, strict=True):
            if n in memory and "lora" in memory:
                mem = memory[n] / memory["lora"]
                right.text(x, base[x] + extra[x] + 0.01, f"mem {mem:.3f}x", ha="center", fontsize=7)
        right.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
        right.set_ylabel(f"amortised step time ({clock}) / lora")
        right.set_title("time per step relative to lora (labels: peak memory / lora)")
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
