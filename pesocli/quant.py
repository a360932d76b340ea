"""Quantised backbones (bitsandbytes): one place that turns ``model.quant`` into quantised layers.

Two ways in, the same layers out (every targeted linear but ``lm_head`` becomes a bitsandbytes
``Linear4bit`` (``nf4``/``fp4``, blocks of 64, optional double quantisation) or
``Linear8bitLt`` (``int8``, LLM.int8() with outlier threshold 6); embeddings, norms and
``lm_head`` stay in the backbone dtype):

- a model folder or cached Hugging Face id is loaded by ``transformers`` with
  :func:`bnb_config` as its ``quantization_config``: each shard is quantised as it is read, so the
  full-precision model is never held (``pesocli.models``);
- a model already in memory (the built-in tiny Llama, the random-weight configs of
  ``scripts/gpu_check.py``) is quantised in place by :func:`quantize_linears`, which builds the
  same bitsandbytes modules from the same weights; ``tests/test_quant.py`` pins that both give
  byte-identical quantised weights.

The quantised base is never written: restarts go into the FP32 low-rank anchor of
:class:`~pesocli.layers.AdaptedLinear`, so nothing is ever re-quantised. bitsandbytes' 4-bit and
8-bit layers run forward and backward on CPU too (on CPU in training mode ``Linear8bitLt``
multiplies by the dequantised weight; on CUDA it runs the int8 kernel with outlier
decomposition).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pesocli.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pesocli.config import ModelConfig

QUANT_TYPES: tuple[str, ...] = ("none", "nf4", "fp4", "int8")
"""Values of ``model.quant``."""

FOUR_BIT: tuple[str, ...] = ("nf4", "fp4")

INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold (transformers' ``llm_int8_threshold`` default)."""

SKIP_MODULES: tuple[str, ...] = ("lm_head",)
"""Linear layers left in full precision (as transformers does: the output projection)."""


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a one-line :class:`ModelError` saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ModelError(f"model.quant needs bitsandbytes (pip install bitsandbytes): {exc}") from exc
    return bitsandbytes


def compute_dtype(cfg: ModelConfig, backbone_dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit layers multiply in: ``auto`` follows the backbone dtype."""
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return backbone_dtype if cfg.compute_dtype == "auto" else table[cfg.compute_dtype]


def bnb_config(cfg: ModelConfig, backbone_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``cfg.quant`` (``None`` for ``none``)."""
    if cfg.quant == "none":
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if cfg.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD,
                                  llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, backbone_dtype),
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear,
    quant: str,
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A bitsandbytes copy of ``linear`` (weight quantised on ``device``; bias kept as is).

    ``quant`` is ``nf4``/``fp4`` (``Linear4bit``, blocks of 64, ``double_quant`` = QLoRA's
    quantised block scales) or ``int8`` (``Linear8bitLt`` without FP16 weights). The weight is
    quantised from its current values and dtype, as transformers does when loading.
    """
    bnb = require_bitsandbytes()
    device = torch.device(device) if device is not None else linear.weight.device
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if quant in FOUR_BIT:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias,
            compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant, quant_type=quant,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant, module=layer).to(device)
    elif quant == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantises only when it moves off the CPU onto a device (the CPU included).
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise ConfigError(f"model.quant must be one of {', '.join(QUANT_TYPES[1:])} here (got {quant!r})")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    layer.train(linear.training)
    keep_cpu_layout(layer)
    return layer


def keep_cpu_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPU; returns ``model``.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad (evaluation,
    generation) rewrites its weight into a CPU-specific layout with BF16 block scales: that
    writes the frozen base (lossy scales), fails for in-features that are not a multiple of the
    block size (the tiny model's 176), and a layer left in that layout no longer propagates
    gradients to its input when training resumes. With the switch off the layer always uses the
    layout it was quantised in; its results are bitwise those of the dequantised weight.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def quantize_linears(model: nn.Module, cfg: ModelConfig, device: torch.device | str,
                     skip: tuple[str, ...] = SKIP_MODULES) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip`` leaves) by its quantised copy, in place.

    Layer by layer, so the full-precision weights are freed as it goes. Returns the replaced names.
    """
    if cfg.quant == "none":
        return []
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dtype = compute_dtype(cfg, linear.weight.dtype) if cfg.quant in FOUR_BIT else None
        setattr(parent, child, quantize_linear(linear, cfg.quant, double_quant=cfg.double_quant,
                                               compute_dtype=dtype, device=device))
    return [name for name, _ in targets]


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by the quantised weights of ``module`` (codes, scales and nested statistics)."""
    total = 0
    for sub in module.modules():
        if not is_quantized(sub):
            continue
        weight = sub.weight
        total += weight.data.numel() * weight.data.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(sub, "state", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def quant_support_error(method_name: str, method_cls: type, quant: str) -> str | None:
    """One line when ``method_cls`` cannot train on a ``quant`` backbone, else ``None``.

    A method that writes the base weights (``needs_writable_base = True`` on its class) cannot run
    on a quantised base: writing would mean re-quantising, which peso never does. All methods
    shipped today keep the base frozen and put restarts into the FP32 anchor, so they all run.
    """
    if quant == "none" or not getattr(method_cls, "needs_writable_base", False):
        return None
    return (f"method {method_name} writes the base weights and cannot train on a {quant} backbone "
            f"(peso never re-quantises); use model.quant: none")
