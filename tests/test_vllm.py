"""Real vLLM in the loop (tests marked ``vllm``: they run where vllm imports, i.e. in the venv that
``scripts/vllm_env.sh`` builds, and are skipped elsewhere; ``pytest -m vllm`` runs them).

- ``peso export --check``'s ``PEFTHelper`` path rejects exactly what vLLM's own ``PEFTHelper``
  rejects (a rank above ``--max-lora-rank``, a bias), on a tiny exported adapter;
- on a short peso-r run of SmolLM2-135M with two restarts, exported in every format (fp32):
  ``peso eval --backend vllm`` gives the same greedy answers (so the same exact match) as
  ``--backend hf`` and a perplexity within :data:`PPL_RTOL`; ``scripts/vllm_serve_check.py``
  passes every format through ``serve.sh`` and the OpenAI server.

One default (unmarked) test checks the same rank rule without vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pesocli.export.check import check_path
from pesocli.export.compress import ALLOWED_RANKS

ROOT = Path(__file__).resolve().parents[1]
PPL_RTOL = 1e-3
"""Largest relative perplexity difference vLLM vs transformers on an fp32 export (measured ~1e-5)."""
FORMATS = ("anchored", "adapter", "merged")


@pytest.fixture(scope="module")
def tiny_adapter(train_embedded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run exported as one adapter (rank ``R + r``) on its written ``base/``."""
    from pesocli.export import ExportOptions, export_run
    from pesocli.runs import load_run

    root = tmp_path_factory.mktemp("vllm-check")
    run = train_embedded(root, {"train.max_steps": 2}).run_dir
    out = root / "adapter"
    export_run(load_run(run), "adapter", out, ExportOptions(verify=False))
    return out


def _rank(folder: Path) -> int:
    return int(json.loads((folder / "adapter_config.json").read_text())["r"])


def _smaller_rank(rank: int) -> int:
    return max(r for r in ALLOWED_RANKS if r < rank)


def test_rank_above_max_lora_rank_is_flagged_without_vllm(tiny_adapter: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, as on a machine without it
    rank = _rank(tiny_adapter)
    assert check_path(tiny_adapter) == []
    assert check_path(tiny_adapter, max_lora_rank=rank) == []
    problems = check_path(tiny_adapter, max_lora_rank=_smaller_rank(rank))
    assert len(problems) == 1 and f"r={rank} is greater than --max-lora-rank" in problems[0]
    assert "not one vLLM accepts" in check_path(tiny_adapter, max_lora_rank=rank + 1)[0]


@pytest.mark.vllm
def test_peft_helper_path_rejects_what_vllm_rejects(tiny_adapter: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner
    from vllm.config import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from pesocli.cli import main as cli

    def vllm_rejects(folder: Path, max_rank: int) -> bool:
        try:
            PEFTHelper.from_local_dir(str(folder), None).validate_legal(LoRAConfig(max_lora_rank=max_rank))
        except ValueError:
            return True
        return False

    rank = _rank(tiny_adapter)
    low = _smaller_rank(rank)
    assert not vllm_rejects(tiny_adapter, rank) and vllm_rejects(tiny_adapter, low)
    assert check_path(tiny_adapter, max_lora_rank=rank) == []
    problems = check_path(tiny_adapter, max_lora_rank=low)
    assert len(problems) == 1, problems
    expected = f"vLLM's PEFTHelper rejects it: LoRA rank {rank} is greater than max_lora_rank {low}."
    assert expected in problems[0]
    # the CLI: exit 1 with that line
    result = CliRunner().invoke(cli, ["export", "--check", str(tiny_adapter), "--max-lora-rank", str(low)])
    assert result.exit_code == 1 and "PEFTHelper rejects it" in result.output
    assert CliRunner().invoke(cli, ["export", "--check", str(tiny_adapter)]).exit_code == 0
    # a bias: vLLM's helper rejects it, and its line is reported next to peso's own
    biased = tmp_path / "biased"
    shutil.copytree(tiny_adapter, biased)
    config = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    assert vllm_rejects(biased, rank)
    assert any("PEFTHelper rejects it: Adapter bias is not supported" in p
               for p in check_path(biased, base=tiny_adapter / "base"))
    # a rank vLLM does not offer at all
    assert any("vLLM refuses --max-lora-rank" in p for p in check_path(tiny_adapter, max_lora_rank=rank + 1))


def _peso(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, "-m", "pesocli.cli", *args], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smollm2_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step peso-r run of SmolLM2-135M (a restart before step 3, 1-based; anchors absorbed), every
    format in fp32."""
    root = tmp_path_factory.mktemp("smollm2-vllm")
    _peso("train", "--config", "commands/smollm2-135m-peso-r.yaml",
          "--data", "pesocli/assets/data/arith_train.jsonl", "--set", "train.max_steps=4",
          "--set", "method.restart_every=2", "--set", "train.batch_size=2", "--set", "data.max_length=64",
          "--set", "checkpoint.every=100", "--set", f"train.output_dir={root}", "--set", "train.run_name=r",
          "--set", "train.quiet=true")
    restarts = [json.loads(line) for line in (root / "r" / "restarts.jsonl").read_text().splitlines()]
    assert {e["step"] for e in restarts if e["kind"] == "restart"} == {3}  # 1-based, as restarts.jsonl v2
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = root / fmt
        _peso("export", str(root / "r"), "--format", fmt, "--out", str(outs[fmt]), "--dtype", "fp32",
              "--no-verify")
    return outs


def _eval(target: Path, backend: str, out: Path) -> tuple[dict, list[dict]]:
    _peso("eval", str(target), "--backend", backend, "--device", "cpu", "--limit", "8",
          "--max-new-tokens", "16", "--max-length", "256", "--out", str(out), "--quiet")
    document = json.loads((out / "eval.json").read_text())
    values = {r["metric"]: r["value"] for r in document["results"]}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return values, predictions


@pytest.mark.vllm
@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_vllm_backend_matches_hf(smollm2_exports: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    hf, hf_predictions = _eval(smollm2_exports[fmt], "hf", tmp_path / "hf")
    vl, vl_predictions = _eval(smollm2_exports[fmt], "vllm", tmp_path / "vllm")
    assert set(hf) == set(vl) and {"exact-match", "perplexity"} <= set(hf)
    assert vl["exact-match"] == hf["exact-match"]
    assert [p.get("prediction") for p in vl_predictions] == [p.get("prediction") for p in hf_predictions]
    assert abs(vl["perplexity"] - hf["perplexity"]) <= PPL_RTOL * hf["perplexity"]


@pytest.mark.vllm
def test_serve_check_passes_every_format(smollm2_exports: dict[str, Path], tmp_path: Path) -> None:
    """serve.sh + the OpenAI server for each format: greedy tokens, top-5 logprobs, text and chat."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vllm_serve_check.py"), "--device", "cpu",
         "--max-model-len", "512", "--log", str(tmp_path / "serve.log"),
         *(str(smollm2_exports[f]) for f in FORMATS)],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count(" PASS in ") == len(FORMATS)
