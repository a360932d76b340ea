"""Model resolution (tiny, folders, aliases, the offline HF cache) and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pesocli.config import ModelConfig, load_config
from pesocli.errors import ConfigError, ModelError
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
