"""Export fidelity: logits of what was written, reloaded from disk, against the trained model in memory.

The error is ``max |logits - reference| / max |reference|`` over a fixed probe batch (token ids
drawn from a seeded generator, the global RNG untouched). Reloading uses only ``transformers``
(and ``peft`` for adapters), as a user would; nothing of peso is involved in the reloaded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pesocli.export.convert import LoRAPair
from pesocli.layers import AdaptedLinear

PROBE_SHAPE = (2, 24)
"""``(batch, length)`` of the probe token batch."""


def probe_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A fixed ``(2, 24)`` batch of token ids in ``[0, vocab_size)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=generator)


@torch.no_grad()
def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """FP32 logits on the CPU of ``model(tokens)`` in eval mode (the model's mode is restored after)."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        return model(input_ids=tokens.to(device)).logits.float().cpu()
    finally:
        model.train(training)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|``."""
    scale = float(reference.abs().max())
    return float((value.float() - reference.float()).abs().max()) / (scale if scale > 0 else 1.0)


class FactorLinear(nn.Module):
    """``base(x) + x @ lora_A^T @ lora_B^T``: a layer as an exported adapter computes it."""

    def __init__(self, base: nn.Module, pair: LoRAPair) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = pair.lora_A.to(device)
        self.lora_B = pair.lora_B.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A),
                                        self.lora_B).to(y.dtype)


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily put ``replacements`` (by module name) into ``model``; the originals come back after."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals[name] = getattr(parent, child)
            setattr(parent, child, module)
        yield model
    finally:
        for name, module in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module)


def adapter_logits(model: nn.Module, layers: dict[str, AdaptedLinear], pairs: dict[str, LoRAPair],
                   tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the base with ``pairs`` as its only adapter (no anchor, no trained delta), in memory."""
    with swapped(model, {name: FactorLinear(layer.base, pairs[name]) for name, layer in layers.items()}):
        return logits(model, tokens)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars or deprecation warnings from transformers/peft while reloading."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_model_folder(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder)`` in the folder's dtype, eval mode."""
    from transformers import AutoModelForCausalLM

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", local_files_only=True)
    return model.to(device).eval()


def load_with_adapter(base: Path | str, adapter: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The base model folder (or cached id) with the PEFT adapter folder ``adapter`` on top."""
    from peft import PeftModel

    if Path(base).is_dir():
        model = load_model_folder(Path(base), device)
    else:
        from pesocli.models import resolve_model

        model = load_model_folder(resolve_model(str(base)).path, device)
    with quiet_loading():
        return PeftModel.from_pretrained(model, str(adapter)).eval()
