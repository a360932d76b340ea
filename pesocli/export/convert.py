"""Every trained layer as exact PEFT LoRA factors, and PEFT's key names and config.

Orientation (``pesocli/layers.py``): weights are ``(out, in)``; a :class:`LoRAPair` holds PEFT's
``lora_A (r, in)`` (the paper's ``B``) and ``lora_B (out, r)`` (the paper's ``A``) with
``Delta W = lora_B @ lora_A``: every scale (``alpha / r``, peso-t's ``diag(xi)``) is already
folded into ``lora_B``. Written adapters therefore use one uniform ``lora_alpha = r`` (scale 1),
which vLLM requires (one scale for every module, ``vllm-adapter-rules.md`` rule 4).

Stacking is PEFT's own trick for PiSSA-style adapters: ``lora_A' = [A_1; A_2]``,
``lora_B' = [B_1, B_2]`` gives ``B' A' = B_1 A_1 + B_2 A_2`` exactly, so a restart method's
``W~ - W0`` (the anchor, rank ``R``) plus the final adapter (rank ``r``) is one adapter of rank
``R + r`` on the untouched base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pesocli.errors import PesoError
from pesocli.layers import AdaptedLinear, base_weight
from pesocli.methods.base import Method

PEFT_PREFIX = "base_model.model."
"""PEFT's prefix in front of the base model's module path (vLLM strips it)."""

ANCHOR_RTOL = 1e-7
"""A dense anchor is factored by SVD keeping singular values above ``ANCHOR_RTOL * sigma_1``."""


@dataclass
class LoRAPair:
    """``Delta W (out, in) = lora_B (out, r) @ lora_A (r, in)``, FP32, every scale folded into ``lora_B``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def weight(self) -> torch.Tensor:
        """The dense ``Delta W (out, in)`` (FP32)."""
        return self.lora_B @ self.lora_A


def anchor_pair(layer: AdaptedLinear) -> LoRAPair:
    """The anchor ``W~ - W0`` of one layer: its stacked pair as is, or a dense anchor factored by SVD."""
    anchor = layer.anchor
    if anchor.mode == "fold":  # load_run unfolds it into a dense anchor; a live one has no W0 apart
        raise PesoError("a folded anchor is inside the base weights; export from the run folder "
                        "(peso export RUN), which reads W0 from the model again")
    if anchor.mode == "dense":
        if anchor.is_zero:
            return _empty(layer)
        u, s, vh = torch.linalg.svd(anchor.weight.detach().float(), full_matrices=False)
        keep = int((s > ANCHOR_RTOL * s[0]).sum()) if s[0] > 0 else 0
        root = s[:keep].sqrt()
        return LoRAPair(lora_A=root[:, None] * vh[:keep], lora_B=u[:, :keep] * root)
    return LoRAPair(lora_A=anchor.down.detach().float(), lora_B=anchor.up.detach().float())


def adapter_pair(method: Method, layer: AdaptedLinear) -> LoRAPair:
    """The method's delta as LoRA factors (``Method.lora_factors``), its scale folded into ``lora_B``."""
    lora_a, lora_b, scale = method.lora_factors(layer.delta)
    return LoRAPair(lora_A=lora_a.detach().float(), lora_B=lora_b.detach().float() * float(scale))


def stack(*pairs: LoRAPair) -> LoRAPair:
    """One pair with ``B' A' = sum_i B_i A_i``: ``A' = [A_1; A_2; ...]``, ``B' = [B_1, B_2, ...]`` (exact)."""
    return LoRAPair(
        lora_A=torch.cat([p.lora_A for p in pairs], dim=0),
        lora_B=torch.cat([p.lora_B for p in pairs], dim=1),
    )


def pad(pair: LoRAPair, rank: int) -> LoRAPair:
    """Append zero rows to ``lora_A`` and zero columns to ``lora_B`` up to ``rank`` (exact)."""
    extra = rank - pair.rank
    if extra < 0:
        raise ValueError(f"cannot pad a rank-{pair.rank} pair down to {rank}")
    if extra == 0:
        return pair
    return LoRAPair(
        lora_A=torch.cat([pair.lora_A, pair.lora_A.new_zeros(extra, pair.lora_A.shape[1])], dim=0),
        lora_B=torch.cat([pair.lora_B, pair.lora_B.new_zeros(pair.lora_B.shape[0], extra)], dim=1),
    )


def layer_pairs(
    layers: dict[str, AdaptedLinear], method: Method, *, anchor: bool, adapter: bool
) -> dict[str, LoRAPair]:
    """Per module name, the stacked pair of the parts asked for (anchor first, then adapter)."""
    out = {}
    for name, layer in layers.items():
        parts = ([anchor_pair(layer)] if anchor else []) + ([adapter_pair(method, layer)] if adapter else [])
        out[name] = stack(*parts)
    return out


@torch.no_grad()
def merged_weight(layer: AdaptedLinear, method: Method, *, adapter: bool) -> torch.Tensor:
    """Dense FP32 ``W0 + anchor (+ the adapter's Delta W)`` of one layer (``W0`` dequantised if needed)."""
    weight = base_weight(layer.base)
    anchor = layer.anchor
    if not anchor.is_zero:
        weight = weight + (anchor.weight.float() if anchor.mode == "dense" else anchor_pair(layer).weight())
    if adapter:
        weight = weight + adapter_pair(method, layer).weight()
    return weight


def peft_key(module: str, which: str) -> str:
    """``base_model.model.<module path>.lora_A.weight`` (``which`` is ``lora_A`` or ``lora_B``)."""
    return f"{PEFT_PREFIX}{module}.{which}.weight"


def peft_state_dict(pairs: dict[str, LoRAPair], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ``adapter_model.safetensors`` tensors: two per module, contiguous, in ``dtype``."""
    tensors = {}
    for module, pair in pairs.items():
        tensors[peft_key(module, "lora_A")] = pair.lora_A.to("cpu", dtype).contiguous()
        tensors[peft_key(module, "lora_B")] = pair.lora_B.to("cpu", dtype).contiguous()
    return tensors


def target_modules(model: torch.nn.Module, adapted: list[str]) -> list[str]:
    """``target_modules`` for ``adapter_config.json`` that selects exactly the ``adapted`` modules.

    The leaf names (``q_proj``, ...) when every linear module with those leaves is adapted (the
    usual case); otherwise the full module paths (PEFT matches a target by name suffix).
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    candidates = {
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in leaves and (isinstance(module, (AdaptedLinear, torch.nn.Linear)))
    }
    return leaves if candidates == set(adapted) else sorted(adapted)


def write_adapter_config(folder, *, rank: int, targets: list[str], base: str) -> None:
    """``adapter_config.json`` through PEFT's own ``LoraConfig`` with the settings vLLM accepts.

    ``lora_alpha = r`` (scale 1: every scale is folded into ``lora_B``), ``bias: none``,
    ``use_dora: false``, ``modules_to_save: null``, no rank/alpha patterns.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        use_dora=False,
        modules_to_save=None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    # PEFT keeps target_modules as a set: write it sorted so the file (and its hash) is reproducible.
    path = Path(folder) / "adapter_config.json"
    data = json.loads(path.read_text())
    data["target_modules"] = sorted(targets)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _empty(layer: AdaptedLinear) -> LoRAPair:
    return LoRAPair(lora_A=torch.zeros(0, layer.in_features), lora_B=torch.zeros(layer.out_features, 0))
