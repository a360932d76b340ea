"""Our ``lora`` is PEFT's LoRA: same forward logits and same adapter gradients on a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pesocli.engine import Engine
from pesocli.methods import METHODS
from pesocli.methods.base import DEFAULT_TARGETS

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 12.0


def _peft_lora_modules(model) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers by the backbone's own module name (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations reached through PEFT
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_lora_equals_peft_forward_and_gradients(make_tiny_model, token_batch, use_rslora):
    backbone = make_tiny_model("llama")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.0,
                             use_rslora=use_rslora)
    reference = peft.get_peft_model(copy.deepcopy(backbone), config)
    reference_layers = _peft_lora_modules(reference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in reference_layers.values():  # PEFT starts at lora_B = 0; make the adapter visible
            module.lora_B["default"].weight.copy_(
                torch.randn(module.lora_B["default"].weight.shape, generator=generator) * 0.1)

    method_cls = METHODS["lora"]
    method = method_cls(method_cls.Config(rank=RANK, alpha=ALPHA, rslora=use_rslora))
    engine = Engine(backbone, method)
    assert set(engine.layers) == set(reference_layers)
    for name, layer in engine.layers.items():
        peft_layer = reference_layers[name]
        assert layer.delta.scale == pytest.approx(peft_layer.scaling["default"])
        with torch.no_grad():
            layer.delta.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.delta.lora_B.copy_(peft_layer.lora_B["default"].weight)
    expected_scale = ALPHA / (math.sqrt(RANK) if use_rslora else RANK)
    assert method.config.scale == pytest.approx(expected_scale)

    ours_out = backbone(token_batch, labels=token_batch)
    ref_out = reference(input_ids=token_batch, labels=token_batch)
    torch.testing.assert_close(ours_out.logits, ref_out.logits, atol=1e-5, rtol=1e-5)
    ours_out.loss.backward()
    ref_out.loss.backward()
    for name, layer in engine.layers.items():
        peft_layer = reference_layers[name]
        for ours, theirs in ((layer.delta.lora_A, peft_layer.lora_A["default"].weight),
                             (layer.delta.lora_B, peft_layer.lora_B["default"].weight)):
            assert ours.grad is not None and float(ours.grad.abs().max()) > 0
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    trainable_ours = {n for n, p in backbone.named_parameters() if p.requires_grad}
    trainable_peft = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert len(trainable_ours) == len(trainable_peft) == 2 * len(engine.layers)


def test_lora_init_follows_peft():
    """PEFT's init: ``lora_A`` Kaiming-uniform, ``a = sqrt(5)`` (bound ``1/sqrt(in)``), ``lora_B = 0``."""
    method_cls = METHODS["lora"]
    delta = method_cls(method_cls.Config(rank=RANK, alpha=ALPHA)).build_delta(30, 200)
    assert float(delta.lora_B.detach().abs().max()) == 0.0
    bound = 1 / math.sqrt(200)
    assert float(delta.lora_A.detach().abs().max()) <= bound
    assert float(delta.lora_A.detach().abs().max()) > 0.9 * bound  # uniform on the whole interval
    assert tuple(delta.lora_A.shape) == (RANK, 200) and tuple(delta.lora_B.shape) == (30, RANK)
