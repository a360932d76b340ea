"""Serve peso exports with real vLLM (CPU or GPU) and compare them with transformers (+ PEFT).

Run it in the vLLM environment that ``scripts/vllm_env.sh`` builds. For each export folder it starts
the export's own ``serve.sh`` (the exact ``vllm serve`` command of its README: ``--dtype``,
``--enable-lora --lora-modules peso=... --max-lora-rank``) on 127.0.0.1 with a port, a context cap
and ``--max-logprobs`` appended, and through the OpenAI-compatible server:

- ``/v1/models`` must list the LoRA's name (``peso``) for exports with an adapter;
- ``/v1/completions`` with prompt token ids (temperature 0, ``ignore_eos``, top-k logprobs) on
  prompts rendered from the run's own chat template and from the alpaca template;
- ``/v1/completions`` with a text prompt and ``/v1/chat/completions`` with messages, ``model=peso``.

The server is then shut down (its whole process group, in ``finally``; every wait is bounded) and
the same export is loaded with transformers (+ peft) on ``--device``:

- greedy tokens from the same prompt ids must equal vLLM's (a swap counts only as a near-tie when
  transformers' own top-2 gap there is under ``--tie``; ties are reported);
- at every generated position, each of vLLM's top-k logprobs must be within ``--tol`` of
  transformers' logprob of that token;
- the text completion and the chat answer must equal transformers' greedy text;
- for exports with a LoRA, the same tokens are also scored without the adapter: the table shows
  how much the adapter changes the logprobs (an adapter vLLM silently ignored would show up as a
  logprob error about that large).

``--bench`` instead measures generation tokens/s with ``vllm.LLM`` (same engine options as the
serve command) for each export, plus several adapter exports at once on one base (multi-LoRA),
each configuration in its own process, one after the other.

Usage::

    python scripts/vllm_serve_check.py --device cpu --run RUN --work /tmp/exports
    python scripts/vllm_serve_check.py --device cpu EXPORT [EXPORT ...]
    python scripts/vllm_serve_check.py --device cpu --bench ANCHORED ADAPTER MERGED --multi A1 A2 A3

Exit status 0 when every export passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHAT_QUESTIONS = (
    "What is 17 + 25?",
    "Tom has 12 apples and gives away 5. How many apples does Tom have left?",
    "Name the capital of France.",
)
ALPACA_INSTRUCTIONS = (
    "Sam has 5 coins and buys 4 more. How many coins does Sam have?",
    "Max has 6 bags with 3 apples in each bag. How many apples does Max have?",
    "Write one sentence about the sea.",
)
BENCH_MARK = "peso-bench-result: "
"""Prefix of the one stdout line a ``--bench-one`` process answers with (vLLM logs to stdout too)."""
DEFAULT_TOL = {"float32": 0.02, "bfloat16": 0.3, "float16": 0.1}
"""``--tol`` by the export's dtype: fp32 kernels agree to ~1e-3 here; bf16 rounding is ~0.1."""


@dataclass
class Served:
    """One prompt's greedy completion as vLLM returned it: tokens and, per position, top-k logprobs."""

    prompt_ids: list[int]
    token_ids: list[int]
    top: list[dict[int, float]]


@dataclass
class Row:
    export: str
    format: str
    prompts: int = 0
    greedy_exact: int = 0
    greedy_ties: int = 0
    max_logprob_error: float = 0.0
    adapter_effect: float | None = None
    text_checks: int = 0
    text_passed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.failures and self.prompts > 0
                and self.greedy_exact + self.greedy_ties == self.prompts
                and self.text_passed == self.text_checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="*", type=Path, help="Export folders written by peso export.")
    parser.add_argument("--run", type=Path, help="Export this run folder first (every --formats).")
    parser.add_argument("--formats", default="anchored,adapter,merged", help="Formats to export with --run.")
    parser.add_argument("--work", type=Path, default=Path("vllm-check"), help="Where --run exports go.")
    parser.add_argument("--dtype", default=None,
                        help="peso export --dtype for --run (default: fp32 on CPU, bf16 on GPU).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="Where transformers runs (and which vLLM build is expected); default: cuda "
                             "when available.")
    parser.add_argument("--max-tokens", type=int, default=16, help="Greedy tokens per prompt.")
    parser.add_argument("--top", type=int, default=5, help="Top-k logprobs compared per position.")
    parser.add_argument("--tol", type=float, default=None,
                        help=f"Largest |logprob(vLLM) - logprob(HF)| (default by dtype: {DEFAULT_TOL}).")
    parser.add_argument("--tie", type=float, default=0.05, help="Top-2 gap under which a greedy swap ties.")
    parser.add_argument("--port", type=int, default=0, help="Server port (0: a free one).")
    parser.add_argument("--max-model-len", type=int, default=1024, help="Context the server allocates.")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds to wait for a server.")
    parser.add_argument("--serve-args", default=None,
                        help="Extra arguments after serve.sh's (GPU default: --gpu-memory-utilization 0.5).")
    parser.add_argument("--log", type=Path, default=Path("vllm-serve.log"), help="The servers' output.")
    parser.add_argument("--bench", action="store_true", help="Measure tokens/s instead of checking.")
    parser.add_argument("--multi", nargs="*", type=Path, default=[],
                        help="With --bench: adapter exports served together on the first one's base.")
    parser.add_argument("--bench-prompts", type=int, default=16)
    parser.add_argument("--bench-tokens", type=int, default=64)
    parser.add_argument("--bench-one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.bench_one:
        print(BENCH_MARK + json.dumps(bench_one(json.loads(args.bench_one))), flush=True)
        return 0
    if not args.exports and args.run is None:
        parser.error("give export folders, or --run RUN")
    args.device = args.device or _default_device()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is a lot here
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("error: vllm does not import here; build its environment with scripts/vllm_env.sh")
        return 2
    exports = list(args.exports)
    if args.run is not None:
        dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
        exports += export_run(args.run, args.formats.split(","), args.work, dtype)
    if args.bench:
        return run_bench(exports, args)
    rows = [check_export(folder.resolve(), args) for folder in exports]
    print_table(rows)
    return 0 if all(row.passed for row in rows) else 1


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def export_run(run: Path, formats: list[str], work: Path, dtype: str) -> list[Path]:
    outs = []
    for fmt in formats:
        out = (work / fmt).resolve()
        subprocess.run([sys.executable, "-m", "pesocli.cli", "export", str(run), "--format", fmt,
                        "--out", str(out), "--dtype", dtype, "--force"], check=True)
        outs.append(out)
    return outs


# ---------------------------------------------------------------------------------------- check


def check_export(folder: Path, args: argparse.Namespace) -> Row:
    started = time.time()
    manifest = json.loads((folder / "peso_export.json").read_text())
    row = Row(folder.name, manifest["format"])
    command = shlex.split(manifest["serve_command"])
    if manifest["serve_command"] not in (folder / "README.md").read_text():
        row.failures.append("README.md does not show the manifest's serve command")
    if manifest["serve_command"] not in (folder / "serve.sh").read_text():
        row.failures.append("serve.sh does not run the manifest's serve command")
    lora = _option(command, "--lora-modules")
    lora_name = None if lora is None else (json.loads(lora)["name"] if lora.startswith("{")
                                           else lora.split("=", 1)[0])
    served_model = lora_name or command[2]
    dtype = _option(command, "--dtype") or "auto"
    tol = args.tol if args.tol is not None else DEFAULT_TOL.get(dtype, 0.3)

    tokenizer = _tokenizer(folder, manifest)
    prompts = _prompts(tokenizer)
    chat = [{"role": "user", "content": CHAT_QUESTIONS[0]}]
    text_prompt = prompts[-1][1]
    extra = shlex.split(args.serve_args if args.serve_args is not None else
                        ("--gpu-memory-utilization 0.5" if args.device == "cuda" else ""))
    try:
        with VllmServer(folder / "serve.sh", args, extra) as server:
            models = server.get("/v1/models")["data"]
            names = [m["id"] for m in models]
            if lora_name is not None and lora_name not in names:
                row.failures.append(f"/v1/models lists {names}, not the adapter {lora_name!r}")
            outputs = [server.complete_ids(served_model, ids, args.max_tokens, args.top)
                       for _, _, ids in prompts]
            text_answer = server.complete_text(served_model, text_prompt, args.max_tokens)
            chat_answer = server.chat(served_model, chat, args.max_tokens)
    except RuntimeError as exc:
        row.failures.append(f"vLLM: {exc}")
        row.seconds = time.time() - started
        return row

    model, base = _hf_models(folder, manifest, args.device)
    for served in outputs:
        row.prompts += 1
        greedy = _hf_greedy(model, served.prompt_ids, len(served.token_ids), ignore_eos=True)
        if greedy == served.token_ids:
            row.greedy_exact += 1
        elif _near_tie(model, served, greedy, args.tie):
            row.greedy_ties += 1
        else:
            row.failures.append(f"greedy tokens differ: vLLM {served.token_ids} vs HF {greedy}")
        row.max_logprob_error = max(row.max_logprob_error, _top_error(model, served))
        if base is not None:
            scored = _hf_logprobs(model, served.prompt_ids, served.token_ids)
            without = _hf_logprobs(base, served.prompt_ids, served.token_ids)
            effect = max(abs(a - b) for a, b in zip(scored, without, strict=True))
            row.adapter_effect = max(row.adapter_effect or 0.0, effect)
    chat_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids
    for kind, ids, answer in (("text completion", tokenizer(text_prompt)["input_ids"], text_answer),
                              ("chat completion", list(chat_ids), chat_answer)):
        row.text_checks += 1
        expected = tokenizer.decode(_hf_greedy(model, ids, args.max_tokens, ignore_eos=False),
                                    skip_special_tokens=True)
        if answer == expected:
            row.text_passed += 1
        else:
            row.failures.append(f"{kind}: vLLM {answer!r} vs HF {expected!r}")
    if row.max_logprob_error > tol:
        row.failures.append(f"top-{args.top} logprobs differ by {row.max_logprob_error:.4f} > {tol}")
    if row.adapter_effect is not None and row.adapter_effect <= tol:
        row.warnings.append("the adapter barely changes the logprobs: these prompts cannot tell whether "
                            "vLLM applied it")
    row.seconds = time.time() - started
    verdict = "PASS" if row.passed else "FAIL"
    print(f"{folder.name}: {row.format} {verdict} in {row.seconds:.0f} s", flush=True)
    return row


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def _prompts(tokenizer) -> list[tuple[str, str, list[int]]]:
    """``(kind, text, ids)``: chat-template prompts (the tokenizer's, which the run trained with for
    messages data) and alpaca prompts (``templates/prompts/alpaca.json``)."""
    from pesocli.data.templates import load_prompt_template

    out = []
    for question in CHAT_QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(("chat", text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    alpaca = load_prompt_template("alpaca")
    for instruction in ALPACA_INSTRUCTIONS:
        text = alpaca.render_prompt(instruction)
        out.append(("alpaca", text, tokenizer(text)["input_ids"]))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """``bash serve.sh --host 127.0.0.1 --port P ...`` in its own process group; ready once
    ``/v1/models`` answers. Leaving the block kills the group (SIGTERM, then SIGKILL)."""

    def __init__(self, serve_sh: Path, args: argparse.Namespace, extra: list[str]) -> None:
        port = args.port or _free_port()
        self.command = ["bash", str(serve_sh), "--host", "127.0.0.1", "--port", str(port),
                        "--max-model-len", str(args.max_model_len), "--max-logprobs", str(args.top), *extra]
        self.url = f"http://127.0.0.1:{port}"
        self.timeout = args.startup_timeout
        self.log_path = args.log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        print("starting:", " ".join(shlex.quote(c) for c in self.command), flush=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's vllm
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        started = time.time()
        while time.time() - started < self.timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode} (see {self.log_path})")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=5)  # noqa: S310 - local server
                print(f"server ready in {time.time() - started:.0f} s", flush=True)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(2)
        raise RuntimeError(f"vllm serve not ready after {self.timeout:.0f} s (see {self.log_path})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.process is not None:
            try:  # engine workers left in the group after the front end exited
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:  # noqa: S310
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - local server
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def complete_ids(self, model: str, prompt_ids: list[int], max_tokens: int, top: int) -> Served:
        body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": top, "return_tokens_as_token_ids": True, "ignore_eos": True}
        logprobs = self.post("/v1/completions", body)["choices"][0]["logprobs"]
        tokens = [_token_id(t) for t in logprobs["tokens"]]
        tops = [{_token_id(t): float(lp) for t, lp in position.items()}
                for position in logprobs["top_logprobs"]]
        return Served(list(prompt_ids), tokens, tops)

    def complete_text(self, model: str, prompt: str, max_tokens: int) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        return self.post("/v1/completions", body)["choices"][0]["text"]

    def chat(self, model: str, messages: list[dict], max_tokens: int) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]


def _token_id(token: str) -> int:
    return int(token.split(":", 1)[1])


def _tokenizer(folder: Path, manifest: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_folder(folder, manifest)))


def _model_folder(folder: Path, manifest: dict) -> Path | str:
    parts = manifest["parts"]
    if "adapter" in parts and "model" not in parts:
        return folder / parts["adapter_base"] if "adapter_base" in parts else parts["adapter_base_external"]
    return folder / parts["model"]


def _hf_models(folder: Path, manifest: dict, device: str):
    """The export as transformers (+ peft) loads it, and the same model without the adapter (or None)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, manifest["dtype"])
    base_path = str(_model_folder(folder, manifest))
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    parts = manifest["parts"]
    if "adapter" not in parts:
        return model, None
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    return PeftModel.from_pretrained(model, str(folder / parts["adapter"])).eval(), base


def _device(model) -> object:
    return next(model.parameters()).device


def _hf_greedy(model, prompt_ids: list[int], n: int, ignore_eos: bool) -> list[int]:
    """Greedy tokens from transformers. ``ignore_eos``: ``n`` plain argmax steps, EOS included as any
    token (what vLLM's ``ignore_eos`` does; ``generate``'s ``min_new_tokens`` would instead mask EOS)."""
    import torch

    if not ignore_eos:
        ids = torch.tensor([prompt_ids], device=_device(model))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False)
        return out[0, len(prompt_ids):].tolist()
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([prompt_ids + tokens], device=_device(model))
            tokens.append(int(model(input_ids=ids).logits[0, -1].argmax()))
    return tokens


def _hf_position_logprobs(model, prompt_ids: list[int], token_ids: list[int]):
    """``(len(token_ids), vocab)`` log-softmax of the teacher-forced logits at each generated position."""
    import torch

    ids = torch.tensor([prompt_ids + token_ids], device=_device(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def _hf_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    logprobs = _hf_position_logprobs(model, prompt_ids, token_ids)
    return [float(logprobs[i, t]) for i, t in enumerate(token_ids)]


def _top_error(model, served: Served) -> float:
    """Largest |vLLM - HF| over every top-k logprob vLLM returned (teacher-forced on vLLM's tokens)."""
    logprobs = _hf_position_logprobs(model, served.prompt_ids, served.token_ids)
    return max((abs(lp - float(logprobs[i, t])) for i, top in enumerate(served.top) for t, lp in top.items()),
               default=0.0)


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
    header = ("export", "format", "greedy exact", "ties", "max |dlogprob| top-k", "adapter effect",
              "text+chat", "seconds", "result")
    lines = [header]
    for row in rows:
        effect = "-" if row.adapter_effect is None else f"{row.adapter_effect:.3f}"
        result = "PASS" if row.passed else "FAIL: " + "; ".join(row.failures or ["greedy mismatch"])
        if row.warnings:
            result += " (warning: " + "; ".join(row.warnings) + ")"
        lines.append((row.export, row.format, f"{row.greedy_exact}/{row.prompts}", str(row.greedy_ties),
                      f"{row.max_logprob_error:.5f}", effect, f"{row.text_passed}/{row.text_checks}",
                      f"{row.seconds:.0f}", result))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


# ---------------------------------------------------------------------------------------- bench


def run_bench(exports: list[Path], args: argparse.Namespace) -> int:
    """Tokens/s per serving configuration, each in a fresh process, one after the other."""
    from pesocli.data.templates import load_prompt_template

    alpaca = load_prompt_template("alpaca")
    prompts = [alpaca.render_prompt(f"What is {a} + {2 * a + 1}? Explain step by step.")
               for a in range(args.bench_prompts)]
    specs = [(f"{json.loads((f / 'peso_export.json').read_text())['format']}", _engine_spec(f))
             for f in exports]
    if args.multi:
        first = _engine_spec(args.multi[0])
        loras = [lora for folder in args.multi for lora in _engine_spec(folder)["loras"]]
        specs.append((f"multi-LoRA ({len(loras)} adapters, one base)", {**first, "loras": loras}))
    rows = []
    for name, spec in specs:
        spec = {**spec, "prompts": prompts, "max_tokens": args.bench_tokens,
                "max_model_len": args.max_model_len, "device": args.device}
        out = subprocess.run([sys.executable, __file__, "--bench-one", json.dumps(spec)], text=True,
                             capture_output=True, timeout=args.startup_timeout + 600)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:])
            return 1
        result = json.loads(next(line for line in out.stdout.splitlines()
                                 if line.startswith(BENCH_MARK))[len(BENCH_MARK):])
        rows.append((name, result))
        print(name, result, flush=True)
    base = next((r["tokens_per_s"] for n, r in rows if n == "merged"), rows[0][1]["tokens_per_s"])
    print("\n| serving | LoRA rank | load s | tokens/s | vs merged |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['max_lora_rank'] or '-'} | {r['load_s']:.0f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f} |")
    return 0


def _engine_spec(folder: Path) -> dict:
    """``vllm.LLM`` options equal to the export's serve command: model, dtype, LoRA modules and rank."""
    folder = folder.resolve()
    command = shlex.split(json.loads((folder / "peso_export.json").read_text())["serve_command"])
    lora = _option(command, "--lora-modules")
    loras = []
    if lora is not None:
        name, path = (lambda d: (d["name"], d["path"]))(json.loads(lora)) if lora.startswith("{") \
            else lora.split("=", 1)
        loras.append([f"{folder.name}-{name}", path])
    rank = _option(command, "--max-lora-rank")
    return {"model": command[2], "dtype": _option(command, "--dtype") or "auto", "loras": loras,
            "max_lora_rank": int(rank) if rank else None}


def bench_one(spec: dict) -> dict:
    """Load one configuration with ``vllm.LLM``, warm up, then time greedy generation of every prompt
    (adapters assigned round-robin); tokens/s counts generated tokens only."""
    import vllm
    from vllm.lora.request import LoRARequest

    from pesocli.evaluate.backends import shutdown_engine

    kwargs = {}
    if spec["loras"]:
        kwargs = {"enable_lora": True, "max_loras": len(spec["loras"]),
                  "max_lora_rank": spec["max_lora_rank"]}
    if spec["device"] == "cuda":
        kwargs["gpu_memory_utilization"] = 0.5
    started = time.time()
    llm = vllm.LLM(model=spec["model"], dtype=spec["dtype"], seed=0, max_model_len=spec["max_model_len"],
                   **kwargs)
    load_s = time.time() - started
    requests = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["loras"])]
    prompts = spec["prompts"]
    lora = [requests[i % len(requests)] for i in range(len(prompts))] if requests else None
    params = vllm.SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:2], params, lora_request=lora[:2] if lora else None, use_tqdm=False)  # warm-up
    started = time.time()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    seconds = time.time() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    shutdown_engine(llm)
    return {"load_s": load_s, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "max_lora_rank": spec["max_lora_rank"], "adapters": len(requests)}


if __name__ == "__main__":
    sys.exit(main())
