"""The adapted layer: forward against the materialised weight, anchors, injection into tiny LMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pesocli.errors import ConfigError
from pesocli.layers import (
    AdaptedLinear,
    LowRankAnchor,
    adapted_layers,
    base_weight,
    effective_weight,
    inject_adapters,
)
from pesocli.methods.base import DEFAULT_TARGETS
from pesocli.methods.lora import LoRADelta
from pesocli.methods.peso_t import SVDDelta

OUT, IN, RANK = 21, 13, 3  # odd, non-square: a transposed weight fails loudly


def _lora_delta(out_features: int = OUT, in_features: int = IN) -> LoRADelta:
    delta = LoRADelta(out_features, in_features, RANK, scale=2.0)
    with torch.no_grad():
        delta.lora_B.normal_()  # LoRA starts at zero; make the delta visible
    return delta


def _svd_delta(out_features: int = OUT, in_features: int = IN) -> SVDDelta:
    delta = SVDDelta(out_features, in_features, RANK)
    with torch.no_grad():
        delta.xi.normal_()
    return delta


def _layer(base: nn.Module, delta: nn.Module, anchor_mode: str = "lowrank") -> AdaptedLinear:
    anchor = LowRankAnchor(base.out_features, base.in_features, mode=anchor_mode)
    anchor.absorb(torch.randn(base.out_features, 2), torch.randn(2, base.in_features))
    return AdaptedLinear(base, delta, anchor)


def _dense_forward(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = effective_weight(layer, layer.delta.weight())
    bias = layer.base.bias
    return x @ weight.T + (0.0 if bias is None else bias.float())


@pytest.mark.parametrize("anchor_mode", ["lowrank", "dense"])
@pytest.mark.parametrize("make_delta", [_lora_delta, _svd_delta], ids=["lora", "svd"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_materialised_weight(anchor_mode, make_delta, bias):
    layer = _layer(nn.Linear(IN, OUT, bias=bias), make_delta(), anchor_mode)
    assert not layer.anchor.is_zero
    x = torch.randn(4, 5, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_forward(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trained", [None, "lora_A", "lora_B"], ids=["lora", "rac-A", "rac-B"])
def test_fused_anchor_and_pair_match_the_separate_chains_in_value_and_gradient(trained):
    """With a low-rank anchor and a LoRA pair the forward is one stacked chain: same output,
    same gradients for the trained factors (none for a frozen one) and for the input."""
    from pesocli.methods.rac_lora import OneSidedDelta

    torch.manual_seed(0)
    if trained is None:
        delta = _lora_delta()
    else:
        delta = OneSidedDelta(OUT, IN, RANK, scale=2.0, trained=trained)
        with torch.no_grad():
            delta.lora_B.normal_()
    layer = _layer(nn.Linear(IN, OUT, bias=True).requires_grad_(False), delta)
    assert layer._fused_low_rank(torch.randn(2, IN)) is not None
    x = torch.randn(4, 5, IN, requires_grad=True)
    layer(x).pow(2).sum().backward()
    fused = {"x": x.grad.clone(), **{n: p.grad for n, p in delta.named_parameters() if p.grad is not None}}
    for p in delta.parameters():
        p.grad = None
    x.grad = None
    factors = delta._factors() if trained else (delta.lora_A, delta.lora_B)
    separate = layer.base(x) + layer.anchor(x) + (x @ factors[0].T) @ factors[1].T * delta.scale
    separate.pow(2).sum().backward()
    reference = {"x": x.grad, **{n: p.grad for n, p in delta.named_parameters() if p.grad is not None}}
    assert set(fused) == set(reference) == ({"x", "lora_A", "lora_B"} if trained is None else {"x", trained})
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], atol=1e-4, rtol=1e-5)


def test_fused_chain_saves_no_more_activations_than_lora():
    """An anchor of rank 40 must not add a (tokens, 40) tensor to what backward keeps."""

    def saved_activation_elems(layer: AdaptedLinear) -> int:
        x = torch.randn(4, 5, IN, requires_grad=True)
        sizes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.shape[:-1] == x.shape[:-1] or t.shape[:1] == (x.shape[0] * x.shape[1],):
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum()
        return sum(sizes)

    plain = AdaptedLinear(nn.Linear(IN, OUT).requires_grad_(False), _lora_delta(), LowRankAnchor(OUT, IN))
    anchored = AdaptedLinear(nn.Linear(IN, OUT).requires_grad_(False), _lora_delta(), LowRankAnchor(OUT, IN))
    anchored.anchor.absorb(torch.randn(OUT, 40), torch.randn(40, IN))
    assert anchored._fused_low_rank(torch.randn(2, IN)) is not None
    assert saved_activation_elems(anchored) == saved_activation_elems(plain) > 0


def test_dropout_keeps_the_separate_chains():
    delta = LoRADelta(OUT, IN, RANK, scale=2.0, dropout=0.5)
    layer = _layer(nn.Linear(IN, OUT), delta)
    assert layer._fused_low_rank(torch.randn(2, IN)) is None  # training: dropout on the delta only
    layer.eval()
    assert layer._fused_low_rank(torch.randn(2, IN)) is not None


def test_zero_anchor_and_zero_delta_is_the_base():
    base = nn.Linear(IN, OUT)
    layer = AdaptedLinear(base, LoRADelta(OUT, IN, RANK, scale=2.0), LowRankAnchor(OUT, IN))
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes nf4 ``Linear4bit`` holding ``linear``'s weight (quantised on CPU by ``.to``)."""
    bnb = pytest.importorskip("bitsandbytes")
    quantised = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
    quantised.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        quantised.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    quantised = quantised.to("cpu")  # Params4bit quantises when moved to a device
    assert quantised.weight.quant_state is not None
    return quantised


def _int8_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes ``Linear8bitLt`` (inference int8, no outlier threshold) holding ``linear``'s weight."""
    bnb = pytest.importorskip("bitsandbytes")
    quantised = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
    quantised.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    if linear.bias is not None:
        quantised.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    quantised = quantised.to("cpu")  # Int8Params quantises when moved to a device
    assert quantised.weight.dtype == torch.int8
    return quantised


@pytest.mark.parametrize("quantise", [_nf4_linear, _int8_linear], ids=["nf4", "int8"])
def test_forward_on_quantised_base_matches_dequantised_weight(quantise):
    linear = nn.Linear(64, 32)  # 4-bit blocks want an in-size that is a multiple of the block
    base = quantise(linear)
    w0 = base_weight(base)
    assert w0.shape == (32, 64)
    assert 0 < float((w0 - linear.weight.detach()).abs().max()) < 0.1  # really quantised, and close
    layer = _layer(base, _lora_delta(32, 64))
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_forward(layer, x), atol=1e-5, rtol=1e-5)


def _anchor_with_redundant_history() -> tuple[LowRankAnchor, int]:
    """An anchor with 3 absorbed rank-3 pairs whose span has rank 5 (stacked rank 9)."""
    anchor = LowRankAnchor(OUT, IN, rank_cap=100)
    left, right = torch.randn(OUT, 5) / OUT**0.5, torch.randn(5, IN) / IN**0.5  # O(1) entries of W
    anchor.absorb(left[:, :3], right[:3])
    anchor.absorb(left[:, 2:], right[2:])  # overlaps the first pair in one direction
    mix = torch.randn(3, 3)
    anchor.absorb(left[:, 1:4] @ mix, torch.linalg.solve(mix, right[1:4]) * 0.5)
    return anchor, 5


def test_absorb_is_exact_and_stacks():
    anchor = LowRankAnchor(OUT, IN)
    assert anchor.is_zero and anchor.rank == 0
    pairs = [(torch.randn(OUT, 2), torch.randn(2, IN)) for _ in range(3)]
    for up, down in pairs:
        anchor.absorb(up, down)
    assert anchor.rank == 6 and not anchor.is_zero
    torch.testing.assert_close(anchor.materialize(), sum(u @ d for u, d in pairs), atol=1e-6, rtol=1e-6)


def test_compress_preserves_layer_function_and_reports_rank():
    anchor, true_rank = _anchor_with_redundant_history()
    assert anchor.rank == 9
    layer = AdaptedLinear(nn.Linear(IN, OUT), _lora_delta(), anchor)
    x = torch.randn(8, IN)
    with torch.no_grad():
        before = layer(x)
        dense_before = anchor.materialize()
        dropped = anchor.compress()
        after = layer(x)
    assert dropped == 0.0
    assert anchor.rank == true_rank
    assert tuple(anchor.up.shape) == (OUT, true_rank) and tuple(anchor.down.shape) == (true_rank, IN)
    assert f"anchor_rank={true_rank}" in layer.extra_repr()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anchor.materialize(), dense_before, atol=1e-5, rtol=1e-5)


def test_absorb_past_the_cap_recompresses_exactly():
    anchor = LowRankAnchor(OUT, IN, rank_cap=4)
    left, right = torch.randn(OUT, 3), torch.randn(3, IN)
    anchor.absorb(left, right)
    anchor.absorb(left, 2 * right)  # stacked rank 6 > cap 4, true rank 3
    assert anchor.rank == 3
    torch.testing.assert_close(anchor.materialize(), 3 * left @ right, atol=1e-5, rtol=1e-5)


def test_lossy_compress_returns_dropped_energy():
    anchor, _ = _anchor_with_redundant_history()
    dense = anchor.materialize()
    sigma = torch.linalg.svdvals(dense)
    dropped = anchor.compress(max_rank=2)
    expected = float(sigma[2:].pow(2).sum() / sigma.pow(2).sum())
    assert dropped == pytest.approx(expected, rel=1e-4)
    assert anchor.rank == 2
    u, s, vh = torch.linalg.svd(dense)
    best_rank_2 = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: what a lossy compress should keep
    torch.testing.assert_close(anchor.materialize(), best_rank_2, atol=1e-5, rtol=1e-5)


def _expected_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{name}": shape for i in range(cfg.num_hidden_layers)
            for name, shape in shapes.items()}


def test_injection_targets_default_projections_with_gqa_shapes(tiny_model, token_batch):
    with torch.no_grad():
        logits_before = tiny_model(token_batch).logits
    rank = 4
    layers = inject_adapters(tiny_model, DEFAULT_TARGETS, lambda out, inp: LoRADelta(out, inp, rank, 2.0))
    expected = _expected_targets(tiny_model)
    assert set(layers) == set(expected)
    assert set(adapted_layers(tiny_model)) == set(expected)
    k_proj = layers["model.layers.0.self_attn.k_proj"]
    assert k_proj.out_features < tiny_model.config.hidden_size  # GQA really is on
    for name, layer in layers.items():
        out_features, in_features = expected[name]
        assert (layer.out_features, layer.in_features) == (out_features, in_features)
        assert tuple(layer.base.weight.shape) == (out_features, in_features)
        assert tuple(layer.delta.lora_B.shape) == (out_features, rank)
        assert tuple(layer.delta.lora_A.shape) == (rank, in_features)
        assert layer.anchor.is_zero
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.delta.{p}" for name in expected for p in ("lora_A", "lora_B")}
    assert not any(layer.base.weight.requires_grad for layer in layers.values())
    assert tiny_model.lm_head.__class__ is nn.Linear  # lm_head is never adapted
    with torch.no_grad():  # lora_B = 0: injection does not change the function
        torch.testing.assert_close(tiny_model(token_batch).logits, logits_before, atol=1e-6, rtol=1e-6)


def test_injection_by_regex_pattern(make_tiny_model):
    model = make_tiny_model("llama")
    layers = inject_adapters(model, (r"model\.layers\.1\.self_attn\.(q|v)_proj",),
                             lambda out, inp: LoRADelta(out, inp, 2, 1.0))
    assert set(layers) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_unmatched_pattern_raises_config_error_listing_linear_layers(make_tiny_model):
    model = make_tiny_model("qwen2")
    with pytest.raises(ConfigError) as info:
        inject_adapters(model, ("query_key_value",), lambda out, inp: LoRADelta(out, inp, 2, 1.0))
    message = str(info.value)
    assert "query_key_value" in message
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert leaf in message
    assert not adapted_layers(model)
