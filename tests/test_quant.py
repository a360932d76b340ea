"""Quantised backbones (nf4, fp4, int8 through bitsandbytes, on CPU), gradient checkpointing, memory.

- the tiny model quantised in place holds exactly the layers (and bytes) transformers builds when
  it loads the same weights with ``BitsAndBytesConfig``;
- the adapted layer over a quantised base computes ``x (W0 + anchor + Delta W)^T`` with ``W0``
  the dequantised weight (FP32 compute);
- ``peso-r`` and ``lora`` lower the loss on every quantisation, and no step or restart writes a
  byte of the quantised base;
- gradient checkpointing leaves the full gradient (exact) and its sketch unchanged, with one
  probe call per layer and pass, and every registered method trains on an nf4 base to the same
  losses with and without it;
- a restart's peak memory stays within 2% of a training step's.
"""

from __future__ import annotations

import math

import pytest
import torch

from pesocli.config import ModelConfig, load_config
from pesocli.engine import Engine
from pesocli.errors import ConfigError
from pesocli.fullgrad import FullGradConfig, estimate_full_gradients
from pesocli.layers import base_weight
from pesocli.methods import METHODS
from pesocli.models import load_model_and_tokenizer, prepare_model
from pesocli.optim import PesoAdamW

bnb = pytest.importorskip("bitsandbytes")

from pesocli.quant import is_quantized, quant_support_error  # noqa: E402 (after the importorskip)

QUANTS = ("nf4", "fp4", "int8")


def _tiny(quant: str = "none", *, gradient_checkpointing: bool = False, **fields):
    cfg = ModelConfig(quant=quant, gradient_checkpointing=gradient_checkpointing, **fields)
    model, tokenizer = load_model_and_tokenizer(cfg, "cpu")
    prepare_model(model, cfg)
    return model.train(), tokenizer


def _tokens(tokenizer, batch: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (batch, length), generator=generator)


def _method(name: str, **options):
    cls = METHODS[name]
    fields = set(cls.Config.field_names())
    config = cls.Config(**{k: v for k, v in {"rank": 4, "alpha": 8.0, **options}.items() if k in fields})
    method = cls(config)
    method.setup(total_steps=10, steps_per_epoch=10)
    return method


def _backward(loss: torch.Tensor) -> float:
    """A gradient pass for :meth:`Engine.step`: backward, and the loss as a number."""
    loss.backward()
    return float(loss.detach())


def _quantised_bytes(model) -> dict[str, bytes]:
    """Every byte of every quantised weight and its statistics, by module name."""
    out = {}
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        weight = module.weight
        parts = [weight.data]
        state = getattr(weight, "quant_state", None)
        while state is not None:
            parts += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if t is not None]
            state = getattr(state, "state2", None)
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        parts += [scb] if scb is not None else []
        data = b"".join(t.detach().reshape(-1).view(torch.uint8).numpy().tobytes() for t in parts)
        out[name.removesuffix(".base")] = data  # the same key before and after adapters wrap the layer
    return out


# ------------------------------------------------------------------------------------------ config


def test_quant_settings_validate() -> None:
    cfg = load_config(None, {"model.quant": "nf4", "model.compute_dtype": "bf16",
                             "model.double_quant": "false", "model.gradient_checkpointing": "true"})
    assert (cfg.model.quant, cfg.model.compute_dtype, cfg.model.double_quant) == ("nf4", "bf16", False)
    assert cfg.model.gradient_checkpointing
    with pytest.raises(ConfigError, match=r"model\.quant must be none, nf4, fp4 or int8"):
        load_config(None, {"model.quant": "nf8"})
    with pytest.raises(ConfigError, match=r"model\.compute_dtype applies to 4-bit"):
        load_config(None, {"model.quant": "int8", "model.compute_dtype": "fp32"})


def test_every_method_may_train_on_a_quantised_base() -> None:
    for name, cls in METHODS.items():
        assert quant_support_error(name, cls, "nf4") is None

    class WritesBase:
        needs_writable_base = True

    message = quant_support_error("dense-ft", WritesBase, "nf4")
    assert message is not None and "\n" not in message and "dense-ft" in message and "nf4" in message
    assert quant_support_error("dense-ft", WritesBase, "none") is None


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("quant", QUANTS)
def test_tiny_in_place_quantisation_equals_transformers_loading(tmp_path, quant: str) -> None:
    """Folder + ``BitsAndBytesConfig`` (the path of real models) and the tiny model's in-place path agree."""
    full, tokenizer = _tiny()
    full.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path), quant=quant), "cpu")
    in_place, _ = _tiny(quant)
    expected_type = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    names = {n for n, m in in_place.named_modules() if isinstance(m, expected_type)}
    assert names == {n for n, m in loaded.named_modules() if isinstance(m, expected_type)}
    assert len(names) == 14 and not any(n.endswith("lm_head") for n in names)
    assert not is_quantized(in_place.lm_head) and not is_quantized(loaded.lm_head)
    assert _quantised_bytes(in_place) == _quantised_bytes(loaded)
    if quant != "int8":
        state = in_place.model.layers[0].self_attn.q_proj.weight.quant_state
        assert (state.quant_type, state.nested, state.blocksize) == (quant, True, 64)


@pytest.mark.parametrize("quant", QUANTS)
def test_adapted_forward_equals_the_dequantised_reference(quant: str) -> None:
    model, tokenizer = _tiny(quant)
    engine = Engine(model, _method("peso-r", restart_every=2), FullGradConfig(power_iters=1))
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-2)
    tokens = _tokens(tokenizer)

    def run_pass() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()

    for step in range(3):  # restarts before steps 0 and 2: non-zero adapters and anchors
        engine.maybe_restart(step, optimizer, run_pass)
        run_pass()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    x = torch.randn(3, 5, 176)
    for layer in engine.layers.values():
        assert is_quantized(layer.base) and not layer.anchor.is_zero
        x_in = x[..., : layer.in_features]
        weight = base_weight(layer.base) + layer.anchor.materialize() + layer.delta.weight().detach()
        reference = x_in @ weight.T
        if layer.base.bias is not None:
            reference = reference + layer.base.bias
        got = layer(x_in).detach()  # training mode, as in training (int8 on CPU: dequantised matmul)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
        layer.eval()
        with torch.no_grad():  # evaluation: 4-bit layers must not switch to bitsandbytes' CPU repacking
            evaluated = layer(x_in)
        layer.train()
        if quant != "int8":  # int8 inference is LLM.int8() (activations quantised too), by design
            torch.testing.assert_close(evaluated, reference, rtol=1e-5,
                                       atol=1e-5 * float(reference.abs().max()))


# ------------------------------------------------------------------------------------------ training


STEPS = 10


@pytest.mark.parametrize("method_name", ["peso-r", "lora"])
@pytest.mark.parametrize("quant", QUANTS)
def test_quantised_tiny_trains_and_the_base_is_never_written(quant: str, method_name: str) -> None:
    model, tokenizer = _tiny(quant)
    before = _quantised_bytes(model)
    assert len(before) == 14
    engine = Engine(model, _method(method_name, restart_every=4, gamma=16.0), FullGradConfig(power_iters=1))
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    tokens = _tokens(tokenizer)

    def loss() -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    losses, restarts = [], []
    for step in range(STEPS):
        if engine.maybe_restart(step, optimizer, lambda: loss().backward()):
            restarts.append(step)
        losses.append(engine.step(optimizer, step, lambda: _backward(loss())))
    model.eval()
    with torch.no_grad():
        final = float(loss())
    assert final < losses[0] - 0.1, (losses, final)
    if method_name == "peso-r":
        assert restarts == [0, 4, 8]
        assert all(layer.anchor.rank > 0 for layer in engine.layers.values())
    assert _quantised_bytes(model) == before  # training, restarts and evaluation left every byte alone


# ----------------------------------------------------------------------------- gradient checkpointing


class _Counting:
    """Wraps a probe and counts its calls (one per layer and backward pass expected)."""

    def __init__(self, probe) -> None:
        self.probe, self.calls = probe, 0

    def observe(self, x, grad_out) -> None:
        self.calls += 1
        self.probe.observe(x, grad_out)


def _gradients(quant: str, checkpointing: str, mode: str):
    """Full-gradient estimates of every adapted layer of a trained-a-bit tiny model."""
    model, tokenizer = _tiny(quant, gradient_checkpointing=checkpointing == "non-reentrant")
    if checkpointing == "reentrant":  # not what peso uses; the probe must still fire once
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(1)
    engine = Engine(model, _method("peso-r"), FullGradConfig())
    for layer in engine.layers.values():  # non-zero adapters and anchors, the same in every call
        with torch.no_grad():
            layer.delta.lora_B.normal_(std=0.05)
        up, down = torch.randn(layer.out_features, 2), torch.randn(2, layer.in_features)
        layer.anchor.absorb(up * 0.05, down * 0.05)
    tokens = [_tokens(tokenizer, batch=2, length=16, seed=s) for s in (0, 1)]
    calls = []

    def run_pass() -> None:
        probes = {name: layer.probe for name, layer in engine.layers.items()}
        counters = {name: _Counting(probe) for name, probe in probes.items() if probe is not None}
        for name, counter in counters.items():
            engine.layers[name].probe = counter
        for batch in tokens:  # two restart micro-batches
            (model(input_ids=batch, labels=batch).loss / len(tokens)).backward()
        calls.extend(counter.calls for counter in counters.values())

    config = FullGradConfig(mode=mode, power_iters=1, oversample=4)
    estimates = estimate_full_gradients(engine.layers, run_pass, 4, config)
    assert calls and set(calls) == {len(tokens)}, "one probe call per layer and micro-batch"
    return estimates, model


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gradient_checkpointing_keeps_the_full_gradient_and_its_sketch(quant: str) -> None:
    exact, model = _gradients(quant, "off", "exact")
    assert not model.model.layers[0].gradient_checkpointing
    for checkpointing in ("non-reentrant", "reentrant"):
        recomputed, model = _gradients(quant, checkpointing, "exact")
        assert model.model.layers[0].gradient_checkpointing
        for name, estimate in exact.items():
            torch.testing.assert_close(recomputed[name].gradient, estimate.gradient, rtol=1e-5,
                                       atol=1e-5 * float(estimate.gradient.abs().max()))
    sketch, _ = _gradients(quant, "off", "sketch")
    sketch_ckpt, _ = _gradients(quant, "non-reentrant", "sketch")
    for name, estimate in sketch.items():
        torch.testing.assert_close(sketch_ckpt[name].coefficients, estimate.coefficients, rtol=1e-5,
                                   atol=1e-5 * float(estimate.coefficients.abs().max()))
        torch.testing.assert_close(sketch_ckpt[name].basis, estimate.basis, rtol=1e-4, atol=1e-5)


def _trajectory(method_name: str, checkpointing: bool) -> list[float]:
    model, tokenizer = _tiny("nf4", gradient_checkpointing=checkpointing)
    before = _quantised_bytes(model)
    torch.manual_seed(0)
    engine = Engine(model, _method(method_name, restart_every=2), FullGradConfig(power_iters=1))
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-2)
    tokens = _tokens(tokenizer, batch=2, length=16)

    def gradient_pass() -> float:
        return _backward(model(input_ids=tokens, labels=tokens).loss)

    losses = []
    for step in range(3):
        engine.maybe_restart(step, optimizer, lambda: model(input_ids=tokens, labels=tokens).loss.backward())
        losses.append(engine.step(optimizer, step, gradient_pass))  # step probes (lorsum) see every backward
    assert all(math.isfinite(v) for v in losses)
    assert _quantised_bytes(model) == before
    return losses


@pytest.mark.parametrize("method_name", list(METHODS))
def test_every_method_trains_on_nf4_the_same_with_gradient_checkpointing(method_name: str) -> None:
    """Every registered method runs on a quantised base (never writing it), checkpointed or not."""
    plain = _trajectory(method_name, checkpointing=False)
    torch.testing.assert_close(_trajectory(method_name, checkpointing=True), plain, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_restart_peak_memory_within_two_percent_of_a_step(checkpointing: bool) -> None:
    from pesocli.memory import ProbeSetup, restart_memory_probe

    # The embedded tiny run's micro-batch (16 x 128). A restart holds, for every layer at once, the
    # sketch's test matrix and product, sum (in + out) (r + p) FP32 = 0.19 MB here: 0.5% of the
    # step at this batch, 2% at 8 x 64, and 168 MB (0.8% of 22 GiB) for Llama-3.1-8B at 4 x 1024.
    result = restart_memory_probe(ProbeSetup(quant="nf4", gradient_checkpointing=checkpointing))
    assert result["step_peak_bytes"] > 4 * result["state_bytes"]  # activations dominate: a real measurement
    assert result["ratio"] <= 1.02, result


def test_memory_probe_sees_allocations() -> None:
    from pesocli.memory import measure_peak

    model = torch.nn.Linear(4, 4)

    def work() -> None:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(1 << 19, dtype=torch.uint8)
        del a, b
        c = torch.empty(1 << 18, dtype=torch.uint8)
        del c

    peak = measure_peak(work, model, None)
    assert peak.extra_bytes == (1 << 20) + (1 << 19)
    assert peak.baseline_bytes == 4 * (16 + 4)



def test_gpu_check_script_runs_on_cpu(tmp_path) -> None:
    """``scripts/gpu_check.py --cpu-dry-run``: the GPU check's code path on the tiny shape (nf4)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    assert module.main(["--cpu-dry-run", "--precisions", "nf4", "--no-peft", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [row["method"] for row in doc["rows"]] == ["lora", "peso-r"] and not doc["skipped"]
    assert all("error" not in row and row["step_s"] > 0 for row in doc["rows"])
    assert doc["rows"][1]["restart_s"] > 0 and doc["ratios"][0]["step_s_ratio"] > 0
