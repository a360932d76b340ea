"""Serve peso exports with vLLM and compare greedy outputs and logprobs with transformers.

Needs a machine with vLLM and a GPU (not the CPU dev machines). For each export folder it runs
the exact ``serve_command`` from the export's ``peso_export.json`` (what the README tells users
to run) plus a port and a memory cap, sends a few prompts to the OpenAI-compatible
``/v1/completions`` endpoint (temperature 0, token ids and logprobs returned), stops the server,
then loads the same export with transformers (+ peft) and:

- generates greedily from the same prompt token ids and compares the tokens;
- scores vLLM's tokens teacher-forced and compares each token's logprob with vLLM's;
- for exports with a LoRA, also scores the tokens without the adapter, so the table shows how
  much the adapter changes the logprobs (an adapter that vLLM silently did not apply shows up
  as a logprob error about as large as that effect).

Usage::

    python scripts/vllm_serve_check.py EXPORT [EXPORT ...]
    python scripts/vllm_serve_check.py --run runs/x --formats anchored,adapter,merged --work /tmp/exports

Export in bf16 or fp16 for vLLM (``--dtype bf16``; that is the default of ``--run``): vLLM's fast
attention kernels do not take fp32. Use a real small model (e.g. a run on ``qwen2.5-0.5b``).

Exit status 0 when every export passes. A greedy mismatch is tolerated only at a near-tie (the
two candidates within ``--tie`` in transformers' logprobs); logprobs must agree within ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nWhat is 17 + 25?\n\n### Response:\n",
    "The capital of France is",
    "def fibonacci(n):",
    "Q: If I have 3 apples and eat one, how many are left?\nA:",
)


@dataclass
class Served:
    """One prompt's greedy completion as vLLM returned it."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class Row:
    export: str
    format: str
    prompts: int = 0
    greedy_match: int = 0
    max_logprob_error: float = 0.0
    adapter_effect: float | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures and self.prompts > 0 and self.greedy_match == self.prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="*", type=Path, help="Export folders written by peso export/merge.")
    parser.add_argument("--run", type=Path, help="Export this run folder first (with peso export).")
    parser.add_argument("--formats", default="anchored,adapter,merged", help="Formats to export with --run.")
    parser.add_argument("--work", type=Path, default=Path("vllm-check"), help="Where --run exports go.")
    parser.add_argument("--dtype", default="bf16",
                        help="peso export --dtype for --run exports (vLLM's fast kernels want bf16/fp16).")
    parser.add_argument("--max-tokens", type=int, default=16, help="Greedy tokens per prompt.")
    parser.add_argument("--tol", type=float, default=0.2, help="Largest |logprob(vLLM) - logprob(HF)|.")
    parser.add_argument("--tie", type=float, default=0.05,
                        help="Logprob gap under which a greedy swap is a tie.")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="Seconds to wait for the server.")
    parser.add_argument("--serve-args", default="--gpu-memory-utilization 0.5",
                        help="Extra arguments appended to each export's vllm serve command.")
    args = parser.parse_args()

    if not args.exports and args.run is None:
        parser.error("give export folders, or --run RUN")
    if shutil.which("vllm") is None:
        print("error: the vllm command is not installed here (pip install vllm on a GPU machine)")
        return 2
    exports = list(args.exports)
    if args.run is not None:
        exports += export_run(args.run, args.formats.split(","), args.work, args.dtype)

    rows = [check_export(folder, args) for folder in exports]
    print_table(rows)
    return 0 if all(row.passed for row in rows) else 1


def export_run(run: Path, formats: list[str], work: Path, dtype: str) -> list[Path]:
    outs = []
    for fmt in formats:
        out = (work / fmt).resolve()
        subprocess.run(["peso", "export", str(run), "--format", fmt, "--out", str(out), "--dtype", dtype,
                        "--force"], check=True)
        outs.append(out)
    return outs


def check_export(folder: Path, args: argparse.Namespace) -> Row:
    manifest = json.loads((folder / "peso_export.json").read_text())
    row = Row(str(folder), manifest["format"])
    command = shlex.split(manifest["serve_command"])
    lora = _lora_name(command)
    served_model = command[2]
    try:
        with VllmServer(command + shlex.split(args.serve_args), args.port, args.startup_timeout) as server:
            tokenizer = _tokenizer(folder, manifest)
            prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
            outputs = [server.complete(lora or served_model, ids, args.max_tokens) for ids in prompt_ids]
    except RuntimeError as exc:
        row.failures.append(f"vLLM: {exc}")
        return row

    model, base = _hf_models(folder, manifest)
    for served in outputs:
        row.prompts += 1
        greedy = _hf_greedy(model, served.prompt_ids, len(served.token_ids))
        scored = _hf_logprobs(model, served.prompt_ids, served.token_ids)
        error = max((abs(a - b) for a, b in zip(scored, served.logprobs, strict=True)), default=0.0)
        row.max_logprob_error = max(row.max_logprob_error, error)
        if greedy == served.token_ids or _near_tie(model, served, greedy, args.tie):
            row.greedy_match += 1
        if base is not None:
            without = _hf_logprobs(base, served.prompt_ids, served.token_ids)
            effect = max(abs(a - b) for a, b in zip(scored, without, strict=True))
            row.adapter_effect = max(row.adapter_effect or 0.0, effect)
    if row.max_logprob_error > args.tol:
        row.failures.append(f"logprobs differ by {row.max_logprob_error:.3f} > {args.tol}")
    if row.adapter_effect is not None and row.adapter_effect <= args.tol:
        row.warnings.append("the adapter barely changes the logprobs: these prompts cannot tell whether "
                            "vLLM applied it")
    return row


class VllmServer:
    """``vllm serve ...`` as a subprocess, ready once ``/v1/models`` answers."""

    def __init__(self, command: list[str], port: int, timeout: float) -> None:
        executable = shutil.which("vllm") or "vllm"
        self.command = [executable, *command[1:], "--port", str(port), "--max-logprobs", "5"]
        self.url = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        print("starting:", " ".join(shlex.quote(c) for c in self.command), flush=True)
        self.log = open("vllm-serve.log", "a")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode} (see vllm-serve.log)")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=5)  # noqa: S310 - local server
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(3)
        raise RuntimeError(f"vllm serve not ready after {self.timeout:.0f} s (see vllm-serve.log)")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def complete(self, model: str, prompt_ids: list[int], max_tokens: int) -> Served:
        body = {
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        request = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - local server
            choice = json.loads(response.read())["choices"][0]
        tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
        return Served(list(prompt_ids), tokens, [float(x) for x in choice["logprobs"]["token_logprobs"]])


def _lora_name(command: list[str]) -> str | None:
    if "--lora-modules" not in command:
        return None
    spec = command[command.index("--lora-modules") + 1]
    return json.loads(spec)["name"] if spec.startswith("{") else spec.split("=", 1)[0]


def _tokenizer(folder: Path, manifest: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_folder(folder, manifest)))


def _model_folder(folder: Path, manifest: dict) -> Path | str:
    parts = manifest["parts"]
    if "adapter" in parts:
        return folder / parts["adapter_base"] if "adapter_base" in parts else parts["adapter_base_external"]
    return folder / parts["model"]


def _hf_models(folder: Path, manifest: dict):
    """The export as transformers (+ peft) loads it, and the same model without the adapter (or None)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, manifest["dtype"])
    base_path = _model_folder(folder, manifest)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype).to("cuda").eval()
    parts = manifest["parts"]
    if "adapter" not in parts:
        return model, None
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype).to("cuda").eval()
    return PeftModel.from_pretrained(model, str(folder / parts["adapter"])).eval(), base


def _hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids], device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def _hf_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    import torch

    ids = torch.tensor([prompt_ids + token_ids], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return logprobs.gather(1, torch.tensor(token_ids, device="cuda")[:, None])[:, 0].tolist()


def _near_tie(model, served: Served, greedy: list[int], tie: float) -> bool:
    """The first differing token is a near-tie in transformers' own distribution."""
    pairs = enumerate(zip(greedy, served.token_ids, strict=False))
    position = next((i for i, (a, b) in pairs if a != b), None)
    if position is None:  # one is a prefix of the other: a length difference, not a tie
        return False
    prefix = served.token_ids[:position]
    theirs = _hf_logprobs(model, served.prompt_ids + prefix, [served.token_ids[position]])[0]
    ours = _hf_logprobs(model, served.prompt_ids + prefix, [greedy[position]])[0]
    return abs(ours - theirs) < tie


def print_table(rows: list[Row]) -> None:
    header = ("export", "format", "greedy", "max |dlogprob|", "adapter effect", "result")
    lines = [header]
    for row in rows:
        effect = "-" if row.adapter_effect is None else f"{row.adapter_effect:.3f}"
        result = "PASS" if row.passed else "FAIL: " + "; ".join(row.failures or ["greedy mismatch"])
        if row.warnings:
            result += " (warning: " + "; ".join(row.warnings) + ")"
        lines.append((row.export, row.format, f"{row.greedy_match}/{row.prompts}",
                      f"{row.max_logprob_error:.4f}", effect, result))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
