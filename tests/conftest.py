"""Shared fixtures: tiny causal LMs built from configs (no downloads), token batches, fixed seeds.

Every tiny family uses GQA (4 query heads over 2 key/value heads, so ``k_proj``/``v_proj`` are
narrower than ``q_proj``) and sizes that are not powers of two, so orientation and shape bugs
show up as errors instead of passing by symmetry.

Fixtures
- ``family``: parametrised over :data:`FAMILIES` (use it to run a test once per family).
- ``make_tiny_model(family, seed=0)``: a fresh FP32 model in eval mode.
- ``tiny_model``: ``make_tiny_model(family)`` for the parametrised ``family``.
- ``make_batch(batch=2, length=12, seed=0)``: a ``(batch, length)`` LongTensor of token ids.
- ``token_batch``: ``make_batch()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral")
"""Tiny model families every shared contract test runs on."""

TINY_SIZES: dict[str, int] = {
    "vocab_size": 101,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
"""Sizes shared by every tiny family (head_dim 12, k/v projections 48 -> 24)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``vllm`` are skipped where vllm is not installed (found without importing it)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm is not installed (bash scripts/vllm_env.sh builds a venv with it)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


def tiny_config(family: str):
    """A ``transformers`` config for the tiny ``family`` (``llama``, ``qwen2`` or ``mistral``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(classes)}")
    extra = {"sliding_window": None} if family == "mistral" else {}
    return classes[family](**TINY_SIZES, tie_word_embeddings=False, **extra)


def build_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised FP32 tiny causal LM in eval mode (same seed -> same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.float().eval()


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_tiny_model() -> Callable[..., torch.nn.Module]:
    return build_tiny_model


@pytest.fixture
def tiny_model(family: str) -> torch.nn.Module:
    return build_tiny_model(family)


def random_tokens(batch: int = 2, length: int = 12, seed: int = 0,
                  vocab_size: int = TINY_SIZES["vocab_size"]) -> torch.Tensor:
    """``(batch, length)`` token ids drawn from their own generator (global RNG untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@pytest.fixture
def make_batch() -> Callable[..., torch.Tensor]:
    return random_tokens


@pytest.fixture
def token_batch() -> torch.Tensor:
    return random_tokens()


def _train_embedded(output_dir, overrides: dict, run_name: str = "run"):
    """Train the embedded default config (quiet) with ``overrides`` into ``output_dir/run_name``."""
    from pesocli.config import embedded_config_path, load_config
    from pesocli.train import run_training

    settings = {"train.quiet": True, "train.output_dir": str(output_dir), "train.run_name": run_name}
    return run_training(load_config(embedded_config_path(), {**settings, **overrides}))


@pytest.fixture(scope="session")
def train_embedded() -> Callable[..., object]:
    """``train_embedded(output_dir, overrides, run_name="run") -> TrainResult``; session scope, so
    module-scoped fixtures can use it too."""
    return _train_embedded
