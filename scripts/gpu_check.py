"""One bounded GPU check: step time, peak memory and restart cost of peso-r against LoRA.

    python scripts/gpu_check.py --out $OUT/gpu_check.json          # on a GPU machine, < 8 minutes
    python scripts/gpu_check.py --cpu-dry-run --out /tmp/check.json # the same code, tiny, on CPU

For each backbone (``1b``: Llama-3.2-1B shape; ``8b``: Llama-3.1-8B shape, when the GPU has the
memory) and each precision (``bf16``; ``nf4`` when bitsandbytes imports), it builds the model from
its config with random weights (nothing is downloaded), then trains it for a few steps with
peso's ``lora`` and ``peso-r`` (restart before step 0 and every ``--restart-every`` steps) through
``pesocli.engine.Engine`` and ``PesoAdamW``, and optionally PEFT's LoRA as the yardstick of
``/work/shared/reference/gpu-anchors.md`` (same batch, same adapters). Per row it records the
median step time, tokens/s, the peak memory of a step and of a later restart
(``torch.cuda.max_memory_allocated`` after a reset), the restart seconds, and per backbone the
ratios peso-r / lora. The JSON is rewritten after every row, so a run stopped by the time budget
still leaves its figures; a backbone whose estimated cost exceeds the time left is skipped and
listed as such.

The default batch (4 x 1024, gradient checkpointing on) is a row of gpu-anchors.md, so the
figures compare with PEFT's 22.2 GiB (bf16) and 12.5 GiB (nf4) there.

All GPUs (``--all-gpus``, on by default when more than one GPU is visible): the first size is saved
as a random-weight model folder and trained by the real trainer, ``peso train --nproc N`` (DDP over
the adapters, then ``--fsdp``), with each method on the shipped arithmetic data (short sequences,
``--batch-size`` per GPU); the rows (``all_gpus`` in the JSON) hold the median step time, tokens/s
and rank 0's peak memory, and ``all_gpus_ratios`` peso-r / lora per mode. The CPU dry run runs
this phase with 2 gloo processes on the tiny shape.

bitsandbytes is not installed on the GPU image: copy its package folder here without the
``libbitsandbytes_*.so`` that the machine does not need (keep ``cpu`` and the ``cudaXYZ`` that
matches ``torch.version.cuda``) into a folder git ignores, carry it, and pass ``--bnb-path``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}
"""Llama configs (Llama-3.2-1B and Llama-3.1-8B shapes; ``tiny`` for the CPU dry run)."""

FIRST_GUESS_S: dict[str, float] = {"tiny": 10.0, "1b": 60.0, "8b": 150.0}
"""Seconds one backbone/precision is expected to take before any has been measured."""

PARAMS_B: dict[str, float] = {"tiny": 0.0001, "1b": 1.24, "8b": 8.03}
"""Parameters in billions (for the memory gate)."""

GIB = 2.0**30


class OutOfTime(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                        help="JSON written after every row")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--sizes", default="1b,8b", help="comma list of 1b, 8b (tiny for a dry run)")
    parser.add_argument("--precisions", default="bf16,nf4", help="comma list of bf16, nf4")
    parser.add_argument("--methods", default="lora,peso-r",
                        help="peso methods to compare (the first is the reference)")
    parser.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True,
                        help="also time PEFT's LoRA (the gpu-anchors.md yardstick)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per method (after one warm-up step)")
    parser.add_argument("--restart-every", type=int, default=3, help="peso-r restart period K in the check")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bnb-path", type=Path, help="folder holding a carried bitsandbytes package")
    parser.add_argument("--all-gpus", action=argparse.BooleanOptionalAction, default=None,
                        help="also train with peso train --nproc N on all N visible GPUs "
                             "(default: when more than one is visible)")
    parser.add_argument("--all-gpus-steps", type=int, default=8, help="optimizer steps per all-GPU run")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the same code on the tiny shape on CPU (fp32 for bf16, 2 x 32 tokens)")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.sizes, args.batch_size, args.seq_len, args.steps = "tiny", 2, 32, 3
        args.restart_every, args.all_gpus_steps = 2, 4
    return args


class Check:
    """Runs the rows in order and keeps the JSON document up to date."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.started = time.monotonic()
        self.deadline = self.started + args.time_budget
        self.device = torch.device("cpu" if args.cpu_dry_run else "cuda")
        self.doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": {},
                                    "rows": [], "ratios": [], "all_gpus": [], "all_gpus_ratios": [],
                                    "skipped": [], "notes": []}
        self.doc["environment"] = self._environment()
        self.bnb_error = self._bnb_error()

    # ---- bookkeeping -------------------------------------------------------------------------
    def _environment(self) -> dict[str, Any]:
        import transformers

        torch = self.torch
        env = {"torch": torch.__version__, "transformers": transformers.__version__,
               "cuda": torch.version.cuda, "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                       gpus_visible=torch.cuda.device_count())
        return env

    def _bnb_error(self) -> str | None:
        if self.args.bnb_path is not None:
            sys.path.insert(0, str(self.args.bnb_path))
        try:
            import bitsandbytes

            self.doc["environment"]["bitsandbytes"] = bitsandbytes.__version__
            return None
        except Exception as exc:  # noqa: BLE001 - any import failure means: no nf4 rows
            return f"{type(exc).__name__}: {exc}".splitlines()[0]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.doc, indent=2) + "\n", encoding="utf-8")

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        return round(self.torch.cuda.max_memory_allocated(self.device) / GIB, 3)

    def allocated_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(self.torch.cuda.memory_allocated(self.device) / GIB, 3)

    # ---- models ------------------------------------------------------------------------------
    def build(self, size: str, precision: str):
        """A random-weight Llama of ``size`` on the device, quantised in place for ``nf4``."""
        torch = self.torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from pesocli.config import ModelConfig
        from pesocli.models import prepare_model
        from pesocli.quant import quantize_linears

        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        config = LlamaConfig(**SHAPES[size], max_position_embeddings=max(self.args.seq_len, 128))
        torch.manual_seed(0)
        with torch.device(self.device):  # initialised on the GPU: seconds, not minutes, for 8B
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model_cfg = ModelConfig(quant="nf4" if precision == "nf4" else "none",
                                gradient_checkpointing=self.args.gradient_checkpointing)
        quantize_linears(model, model_cfg, self.device)  # no-op for bf16
        prepare_model(model, model_cfg)
        return model.train()

    def memory_gate(self, size: str, precision: str) -> str | None:
        """Why ``size`` cannot fit (bf16 weights are built before nf4 quantisation), else ``None``."""
        if self.device.type != "cuda":
            return None
        free, _ = self.torch.cuda.mem_get_info(self.device)
        need = PARAMS_B[size] * 1e9 * 2 * (1.6 if precision == "bf16" else 1.2)  # weights + working room
        if free < need:
            return f"needs about {need / GIB:.0f} GiB, {free / GIB:.0f} GiB free"
        return None

    # ---- one method on one model -------------------------------------------------------------
    def run_peso(self, model, method_name: str, tokens) -> dict[str, Any]:
        torch = self.torch
        from pesocli.engine import Engine
        from pesocli.fullgrad import FullGradConfig
        from pesocli.memory import measure_peak
        from pesocli.methods import METHODS
        from pesocli.optim import PesoAdamW

        a = self.args
        cls = METHODS[method_name]
        options = {"rank": a.rank, "alpha": 2.0 * a.rank, "restart_every": a.restart_every}
        fields = set(cls.Config.field_names())
        method = cls(cls.Config(**{k: v for k, v in options.items() if k in fields}))
        total = a.steps + 1
        method.setup(total_steps=total, steps_per_epoch=total)
        torch.manual_seed(0)
        engine = Engine(model, method, FullGradConfig())
        optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-4, weight_decay=0.0)

        def loss():
            return model(input_ids=tokens, labels=tokens, use_cache=False).loss

        def restart_pass() -> None:
            loss().backward()

        def gradient_pass():
            value = loss()
            value.backward()
            return value.detach()

        trainable = sum(p.numel() for p in engine.trainable_parameters())
        row: dict[str, Any] = {"trainable_m": round(trainable / 1e6, 2)}
        step_times, step_peaks, losses, restarts = [], [], [], []
        try:
            for step in range(total):
                if self.left() < 0:
                    raise OutOfTime
                if method.restart_due(step):
                    peak = measure_peak(lambda s=step: engine.maybe_restart(s, optimizer, restart_pass),
                                        model, optimizer, self.device)
                    restarts.append({"step": step, "seconds": round(peak.seconds, 4),
                                     "peak_gib": round(peak.peak_bytes / GIB, 3) if self.device.type == "cuda"
                                     else None})
                self.reset_peak()
                self.sync()
                start = time.perf_counter()
                value = engine.step(optimizer, step, gradient_pass, max_grad_norm=1.0)
                self.sync()
                if step > 0:  # step 0 warms up kernels and creates the optimizer state
                    step_times.append(time.perf_counter() - start)
                    step_peaks.append(self.peak_gib())
                losses.append(float(value.detach()))
        finally:
            strip_adapters(model, engine.layers)  # engine and optimizer go with this frame; run() frees
        return self._summarise(row, step_times, step_peaks, losses, restarts)

    def run_peft(self, model, tokens) -> dict[str, Any]:
        torch = self.torch
        from peft import LoraConfig, get_peft_model

        from pesocli.methods.base import DEFAULT_TARGETS

        a = self.args
        config = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                            target_modules=list(DEFAULT_TARGETS))
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        row: dict[str, Any] = {"trainable_m": round(sum(p.numel() for p in params) / 1e6, 2)}
        step_times, step_peaks, losses = [], [], []
        try:
            for step in range(a.steps + 1):
                if self.left() < 0:
                    raise OutOfTime
                self.reset_peak()
                self.sync()
                start = time.perf_counter()
                value = peft_model(input_ids=tokens, labels=tokens, use_cache=False).loss
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.sync()
                if step > 0:
                    step_times.append(time.perf_counter() - start)
                    step_peaks.append(self.peak_gib())
                losses.append(float(value.detach()))
        finally:
            peft_model.base_model.unload()  # the plain linear layers back, in place
        return self._summarise(row, step_times, step_peaks, losses, [])

    def _summarise(self, row, step_times, step_peaks, losses, restarts) -> dict[str, Any]:
        tokens = self.args.batch_size * self.args.seq_len
        step_s = statistics.median(step_times) if step_times else math.nan
        peaks = [p for p in step_peaks if p is not None]
        later = [r for r in restarts if r["step"] > 0]
        row.update(
            step_s=round(step_s, 4),
            tokens_per_s=round(tokens / step_s, 1) if step_s == step_s else None,
            step_peak_gib=max(peaks) if peaks else None,
            restart_s=later[0]["seconds"] if later else None,
            restart_peak_gib=later[0]["peak_gib"] if later else None,
            init_restart_s=restarts[0]["seconds"] if restarts and restarts[0]["step"] == 0 else None,
            restarts=restarts,
            loss_first=round(losses[0], 4) if losses else None,
            loss_last=round(losses[-1], 4) if losses else None,
        )
        return row

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    # ---- the whole check ---------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        measured: dict[str, float] = {}
        sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
        precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
        for size in sizes:
            for precision in precisions:
                label = f"{size}/{precision}"
                if precision == "nf4" and self.bnb_error:
                    self.skip(label, f"bitsandbytes does not import: {self.bnb_error}")
                    continue
                estimate = measured.get(size, FIRST_GUESS_S[size])
                if self.left() < estimate:
                    self.skip(label, f"time budget: {self.left():.0f} s left, about {estimate:.0f} s needed")
                    continue
                reason = self.memory_gate(size, precision)
                if reason:
                    self.skip(label, f"memory: {reason}")
                    continue
                began = time.monotonic()
                self.run_backbone(size, precision)
                measured[size] = (time.monotonic() - began) * 1.15
        self.run_all_gpus(sizes[0] if sizes else "1b")
        self.write()

    # ---- all GPUs: the real trainer under torchrun -------------------------------------------
    def run_all_gpus(self, size: str) -> None:
        """``peso train --nproc N`` (DDP, then FSDP2) for each method on a random-weight ``size`` folder."""
        import subprocess
        import tempfile

        a = self.args
        gpus = 2 if self.device.type == "cpu" else self.torch.cuda.device_count()
        wanted = a.all_gpus if a.all_gpus is not None else gpus > 1
        if not wanted:
            self.doc["notes"].append(f"all-GPU rows skipped: {gpus} GPU visible (pass --all-gpus to force)")
            return
        modes = [("ddp", []), ("fsdp", ["--fsdp"])]
        estimate = FIRST_GUESS_S[size] * len(modes) * len(a.methods.split(","))
        if self.left() < estimate / 2:
            why = f"time budget: {self.left():.0f} s left, about {estimate:.0f} s needed"
            self.skip(f"all-gpus/{size}", why)
            return
        with tempfile.TemporaryDirectory(prefix="peso-gpu-check-") as tmp:
            folder = self.save_random_model(size, Path(tmp) / "model")
            env = dict(os.environ, PESO_DEBUG="0")
            if a.bnb_path is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(a.bnb_path), env.get("PYTHONPATH")]))
            results: dict[str, dict[str, dict[str, Any]]] = {}
            for mode, flags in modes:
                for method in a.methods.split(","):
                    if self.left() < 30:
                        self.skip(f"all-gpus/{size}/{mode}/{method}", "time budget ran out")
                        continue
                    name = f"{mode}-{method}"
                    command = [
                        sys.executable, "-m", "pesocli.cli", "train", "--nproc", str(gpus), *flags,
                        "--model", str(folder), "--method", method, "--rank", str(a.rank),
                        "--alpha", str(2.0 * a.rank), "--max-steps", str(a.all_gpus_steps),
                        "--batch-size", str(a.batch_size), "--lr", "1e-4", "--quiet",
                        "--output-dir", tmp, "--run-name", name, "--device", self.device.type,
                        "--set", "train.export=none", "--set", "data.val_split=0.01",
                        "--set", "train.log_every=1",
                    ]  # fmt: skip
                    if method != "lora":
                        command += ["--restart-every", str(a.restart_every)]
                    if a.gradient_checkpointing:
                        command.append("--gradient-checkpointing")
                    row: dict[str, Any] = {"size": size, "gpus": gpus, "mode": mode, "method": method}
                    began = time.monotonic()
                    try:
                        done = subprocess.run(command, env=env, capture_output=True, text=True,
                                              timeout=max(self.left() - 10, 10))
                        if done.returncode != 0:
                            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                            row["error"] = f"exit {done.returncode}: {tail}"
                        else:
                            row.update(self._trainer_figures(Path(tmp) / name, a.batch_size * gpus))
                    except subprocess.TimeoutExpired:
                        row["error"] = "time budget ran out mid-run"
                    row["wall_s"] = round(time.monotonic() - began, 1)
                    self.doc["all_gpus"].append(row)
                    results.setdefault(mode, {})[method] = row
                    print("all-gpus " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                    self.write()
            names = a.methods.split(",")
            for mode, rows in results.items():
                ref = rows.get(names[0], {})
                for method, row in rows.items():
                    if method == names[0] or "error" in row or "error" in ref or not ref:
                        continue
                    ratio = {"mode": mode, "method": method, "versus": names[0], "gpus": gpus}
                    for key in ("step_s", "peak_gib"):
                        if row.get(key) and ref.get(key):
                            ratio[f"{key.replace('_gib', '')}_ratio"] = round(row[key] / ref[key], 4)
                    self.doc["all_gpus_ratios"].append(ratio)
                    print("  ratio " + ", ".join(f"{k}={v}" for k, v in ratio.items()), flush=True)

    def save_random_model(self, size: str, folder: Path) -> Path:
        """A random-weight Llama of ``size`` with the tiny tokenizer, written as a model folder."""
        from pesocli.models import load_tiny_tokenizer

        model = self.build(size, "bf16")
        model.save_pretrained(folder, safe_serialization=True)
        load_tiny_tokenizer().save_pretrained(folder)
        model = None  # noqa: F841
        self.free()
        return folder

    @staticmethod
    def _trainer_figures(run: Path, sequences_per_step: int) -> dict[str, Any]:
        """Median step time (steps without a restart, after the first), tokens/s and peak memory of rank 0."""
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        pairs = list(zip(steps, steps[1:], strict=False))
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in pairs if not b.get("restart")]
        step_s = statistics.median(times[1:] or times) if times else math.nan
        tokens = statistics.median([b["tokens"] - a["tokens"] for a, b in pairs]) if pairs else None
        summary = json.loads((run / "summary.json").read_text())
        return {
            "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s, 1) if tokens and step_s == step_s else None,
            "sequences_per_step": sequences_per_step,
            "peak_gib": round(summary["peak_memory_bytes"] / GIB, 3),
            "loss_first": round(steps[0]["loss"], 4) if steps else None,
            "loss_last": round(steps[-1]["loss"], 4) if steps else None,
            "restarts": summary.get("restarts"),
        }

    def run_backbone(self, size: str, precision: str) -> None:
        torch = self.torch
        a = self.args
        base = {"size": size, "precision": precision, "batch": a.batch_size, "seq": a.seq_len,
                "gradient_checkpointing": a.gradient_checkpointing}
        try:
            self.reset_peak()
            began = time.perf_counter()
            model = self.build(size, precision)
            self.sync()
            from pesocli.quant import quantized_bytes

            base.update(build_s=round(time.perf_counter() - began, 1), weights_gib=self.allocated_gib(),
                        quantized_gib=round(quantized_bytes(model) / GIB, 3))
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, model.config.vocab_size, (a.batch_size, a.seq_len), generator=generator)
            tokens = tokens.to(self.device)
            runs = [(name, lambda n=name: self.run_peso(model, n, tokens)) for name in a.methods.split(",")]
            if a.peft:
                runs.append(("peft-lora", lambda: self.run_peft(model, tokens)))
            results = {}
            for name, fn in runs:
                try:
                    row = {**base, "method": name, **fn()}
                    self.free()
                except torch.cuda.OutOfMemoryError as exc:
                    row = {**base, "method": name, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                    self.free()
                except OutOfTime:
                    self.skip(f"{size}/{precision}/{name}", "time budget ran out mid-run")
                    break
                except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                    row = {**base, "method": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    self.free()
                self.doc["rows"].append(row)
                results[name] = row
                print(format_row(row), flush=True)
                self.write()
            self.add_ratios(size, precision, results)
        except torch.cuda.OutOfMemoryError as exc:
            self.skip(f"{size}/{precision}", f"out of memory while building: {str(exc).splitlines()[0]}")
        finally:
            model = None  # noqa: F841 - drop the backbone before the next one
            self.free()
            self.write()

    def add_ratios(self, size: str, precision: str, results: dict[str, dict[str, Any]]) -> None:
        names = self.args.methods.split(",")
        reference = results.get(names[0], {})
        for name, row in results.items():
            if name == names[0] or "error" in row or "error" in reference or not reference:
                continue
            ratio = {"size": size, "precision": precision, "method": name, "versus": names[0]}
            for key in ("step_s", "step_peak_gib"):
                if row.get(key) and reference.get(key):
                    ratio[key.replace("_gib", "") + "_ratio"] = round(row[key] / reference[key], 4)
            if row.get("restart_peak_gib") and row.get("step_peak_gib"):
                ratio["restart_peak_over_step_peak"] = round(
                    row["restart_peak_gib"] / row["step_peak_gib"], 4)
            self.doc["ratios"].append(ratio)
            print("  ratio " + ", ".join(f"{k}={v}" for k, v in ratio.items()), flush=True)

    def skip(self, what: str, why: str) -> None:
        self.doc["skipped"].append({"what": what, "why": why})
        print(f"skipped {what}: {why}", flush=True)
        self.write()


def strip_adapters(model, layers) -> None:
    """Put every adapted layer's frozen ``base`` back in its place (the next method starts clean)."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['size']:>4} {row['precision']:>4} {row['method']:>9}  error: {row['error']}"
    restart = ""
    if row.get("restart_s"):
        restart = f"restart {row['restart_s']:.3f} s / {row['restart_peak_gib']} GiB"
    return (f"{row['size']:>4} {row['precision']:>4} {row['method']:>9}  step {row['step_s']:.4f} s "
            f"({row['tokens_per_s']} tok/s)  peak {row['step_peak_gib']} GiB  "
            f"weights {row['weights_gib']} GiB  {restart}  loss {row['loss_first']} -> {row['loss_last']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device visible: run with --cpu-dry-run to exercise the script on CPU",
                  file=sys.stderr)
            return 2
    check = Check(args)

    def out_of_time(signum, frame):  # noqa: ANN001, ARG001 - the hard stop, a minute past the budget
        raise OutOfTime

    alarm = hasattr(signal, "SIGALRM")
    if alarm:
        previous = signal.signal(signal.SIGALRM, out_of_time)
        signal.alarm(int(args.time_budget) + 60)
    try:
        check.run()
    except OutOfTime:
        check.doc["notes"].append("stopped by the hard time limit")
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        check.write()
    print(f"wrote {args.out} ({len(check.doc['rows'])} rows, {len(check.doc['skipped'])} skipped) "
          f"in {time.monotonic() - check.started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
