"""Full-gradient estimates: the sketch against the exact SVD, the exact path against autograd.

The single-layer problems use ``loss = sum(layer(X) * C)``, whose full gradient is known in
closed form: ``G = dL/dW = C^T X`` (``(out, in)``), whatever the layer's weights are.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pesocli.engine import Engine
from pesocli.fullgrad import DenseGradient, FullGradConfig, SketchedGradient, estimate_full_gradients
from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.linalg import principal_angles_deg
from pesocli.methods import METHODS
from pesocli.methods.base import MethodConfig
from pesocli.methods.lora import LoRADelta

OUT, IN, TOKENS, RANK = 48, 64, 24, 4


def _adapted_layer(out_features: int = OUT, in_features: int = IN) -> AdaptedLinear:
    delta = LoRADelta(out_features, in_features, RANK, scale=2.0)
    with torch.no_grad():
        delta.lora_B.normal_(std=0.1)
    anchor = LowRankAnchor(out_features, in_features)
    anchor.absorb(torch.randn(out_features, 2) * 0.1, torch.randn(2, in_features) * 0.1)
    base = nn.Linear(in_features, out_features).requires_grad_(False)  # frozen, as inject_adapters does
    return AdaptedLinear(base, delta, anchor)


def _decaying_problem(decay: float = 0.8) -> tuple[AdaptedLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(layer, X (N, in), C (N, out), G)`` with ``G = C^T X = U diag(decay^i) V^T``."""
    u = torch.linalg.qr(torch.randn(OUT, TOKENS))[0]
    v = torch.linalg.qr(torch.randn(IN, TOKENS))[0]
    sigma = decay ** torch.arange(TOKENS, dtype=torch.float32)
    x, c = v.T.contiguous(), (u * sigma).T.contiguous()
    return _adapted_layer(), x, c, u @ torch.diag(sigma) @ v.T


class _Counter:
    def __init__(self, layer: AdaptedLinear, x: torch.Tensor, c: torch.Tensor) -> None:
        self.layer, self.x, self.c, self.calls = layer, x, c, 0

    def __call__(self) -> None:
        self.calls += 1
        (self.layer(self.x) * self.c).sum().backward()


def _worst_angle_rad(got: torch.Tensor, ref: torch.Tensor) -> float:
    # FP64: arccos of FP32 cosines cannot resolve angles below ~5e-4 rad.
    return math.radians(float(principal_angles_deg(got.double(), ref.double()).max()))


def _sketch(power_iters: int):
    layer, x, c, g = _decaying_problem()
    config = FullGradConfig(mode="sketch", power_iters=power_iters, oversample=8)
    return estimate_full_gradients({"proj": layer}, _Counter(layer, x, c), RANK, config)["proj"], g


def test_sketch_top_r_subspace_matches_exact_svd():
    estimate, g = _sketch(power_iters=2)
    assert isinstance(estimate, SketchedGradient)
    u, s, v = estimate.top_r(RANK)
    assert u.shape == (OUT, RANK) and s.shape == (RANK,) and v.shape == (IN, RANK)
    u_ref, s_ref, vh_ref = torch.linalg.svd(g.double())
    assert _worst_angle_rad(u, u_ref[:, :RANK]) < 1e-3
    assert _worst_angle_rad(v, vh_ref[:RANK].T) < 1e-3
    torch.testing.assert_close(s, s_ref[:RANK].float(), atol=1e-5, rtol=1e-4)
    # U^T G V in the top-r bases is diag(S) for the sketch and the exact gradient alike.
    torch.testing.assert_close(estimate.project(u, v), torch.diag(s), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(DenseGradient(g).project(u, v), torch.diag(s), atol=1e-4, rtol=1e-4)


def test_power_passes_are_what_make_the_sketch_accurate():
    worst = []
    for q in (0, 2):
        estimate, g = _sketch(power_iters=q)
        worst.append(_worst_angle_rad(estimate.top_r(RANK)[0], torch.linalg.svd(g.double())[0][:, :RANK]))
    assert worst[0] > 1e-2 > 1e-3 > worst[1]


@pytest.mark.parametrize("power_iters", [0, 1, 2, 3])
def test_sketch_calls_run_pass_2q_plus_2_times(power_iters):
    layer, x, c, _ = _decaying_problem()
    counter = _Counter(layer, x, c)
    config = FullGradConfig(power_iters=power_iters, single_pass=False)
    estimate_full_gradients({"proj": layer}, counter, RANK, config)
    assert counter.calls == 2 * power_iters + 2


@pytest.mark.parametrize("power_iters", [0, 2])
def test_single_pass_gives_the_multi_pass_sketch_in_one_pass(power_iters):
    layer, x, c, _ = _decaying_problem()
    results = {}
    for single in (True, False):
        counter = _Counter(layer, x, c)
        config = FullGradConfig(power_iters=power_iters, single_pass=single)
        results[single] = estimate_full_gradients({"proj": layer}, counter, RANK, config)["proj"]
        assert counter.calls == (1 if single else 2 * power_iters + 2)
    torch.testing.assert_close(results[True].basis, results[False].basis, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[True].coefficients, results[False].coefficients, atol=1e-5, rtol=1e-5)


def test_single_pass_falls_back_when_a_layer_runs_twice_in_a_pass():
    """A shared module sees two (x, grad_out) per pass: the products must be summed between passes."""
    layer, x, c, _ = _decaying_problem()
    x2, c2 = torch.randn_like(x), torch.randn_like(c)
    calls = []

    def run_pass() -> None:
        calls.append(1)
        ((layer(x) * c).sum() + (layer(x2) * c2).sum()).backward()

    estimate = estimate_full_gradients({"proj": layer}, run_pass, RANK, FullGradConfig(power_iters=1))["proj"]
    assert len(calls) == 1 + 2 * 1 + 2  # the refused single pass, then the multi-pass path
    multi = FullGradConfig(power_iters=1, single_pass=False)
    reference = estimate_full_gradients({"proj": layer}, run_pass, RANK, multi)["proj"]
    torch.testing.assert_close(estimate.basis, reference.basis)
    torch.testing.assert_close(estimate.coefficients, reference.coefficients)


def test_exact_mode_runs_one_pass_per_layer():
    layers = {"a": _adapted_layer(), "b": _adapted_layer()}
    x, c = torch.randn(TOKENS, IN), torch.randn(TOKENS, OUT)
    calls = []

    def run_pass() -> None:
        calls.append(1)
        ((layers["a"](x) + layers["b"](x)) * c).sum().backward()

    out = estimate_full_gradients(layers, run_pass, RANK, FullGradConfig(mode="exact"))
    assert len(calls) == 2 and set(out) == {"a", "b"}
    for estimate in out.values():  # both layers see the same G = C^T X
        torch.testing.assert_close(estimate.gradient, c.T @ x, atol=1e-5, rtol=1e-5)


def test_exact_mode_equals_autograd_on_a_plain_linear():
    layer = _adapted_layer()
    x, c = torch.randn(3, 8, IN), torch.randn(3, 8, OUT)

    def loss_of(module: nn.Module) -> torch.Tensor:
        return (torch.tanh(module(x)) * c).sum()  # non-linear: G depends on the weights

    def run_pass() -> None:
        loss_of(layer).backward()

    exact = estimate_full_gradients({"proj": layer}, run_pass, RANK, FullGradConfig(mode="exact"))["proj"]
    plain = nn.Linear(IN, OUT)
    with torch.no_grad():
        plain.weight.copy_(effective_weight(layer, layer.delta.weight()))
        plain.bias.copy_(layer.base.bias)
    loss_of(plain).backward()
    assert isinstance(exact, DenseGradient)
    torch.testing.assert_close(exact.gradient, plain.weight.grad, atol=1e-5, rtol=1e-5)


def test_full_width_sketch_reproduces_every_layer_gradient_of_a_tiny_lm(make_tiny_model, token_batch):
    """Through a real model (GQA k/v shapes): with ``r + p >= min(out, in)`` the sketch is exact."""
    model = make_tiny_model("llama")
    reference = copy.deepcopy(model)
    method = METHODS["lora"](MethodConfig(rank=RANK, alpha=8.0))
    engine = Engine(model, method)

    def run_pass() -> None:
        model(token_batch, labels=token_batch).loss.backward()

    wide = FullGradConfig(oversample=200, power_iters=1)
    sketches = estimate_full_gradients(engine.layers, run_pass, RANK, wide)
    exact = estimate_full_gradients(engine.layers, run_pass, RANK, FullGradConfig(mode="exact"))
    reference(token_batch, labels=token_batch).loss.backward()  # lora_B = 0: W = W0
    for name, sketch in sketches.items():
        dense = reference.get_submodule(name).weight.grad
        torch.testing.assert_close(exact[name].gradient, dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sketch.basis @ sketch.coefficients, dense, atol=1e-5, rtol=1e-4)


def test_adapter_grads_and_weights_are_untouched_by_estimation():
    layer, x, c, _ = _decaying_problem()
    marker = torch.randn_like(layer.delta.lora_A)
    layer.delta.lora_A.grad = marker
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for mode in ("sketch", "exact"):
        estimate_full_gradients({"proj": layer}, _Counter(layer, x, c), RANK, FullGradConfig(mode=mode))
        assert layer.delta.lora_A.grad is marker
        torch.testing.assert_close(layer.delta.lora_A.grad, marker, atol=0, rtol=0)
        assert layer.delta.lora_B.grad is None
        assert layer.probe is None
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.detach(), weights[n], atol=0, rtol=0)


class _AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an ATen op allocates (views and in-place results excluded).

    Sees forward, backward (CPU autograd runs on the calling thread) and the probes' hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _largest_allocation(mode: str) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    layer, x, c, _ = _decaying_problem()
    run_pass = _Counter(layer, x, c)
    recorder = _AllocationRecorder()
    with recorder:
        estimate_full_gradients({"proj": layer}, run_pass, RANK, FullGradConfig(mode=mode, oversample=8))
    return recorder.shapes, max(math.prod(shape) for _, shape in recorder.shapes)


def test_sketch_never_allocates_an_out_by_in_tensor():
    shapes, largest = _largest_allocation("sketch")
    width = RANK + 8
    # The recorder does see the probes inside backward: x @ Omega is (tokens, r + p).
    assert any(shape == (TOKENS, width) for _, shape in shapes)
    assert largest < OUT * IN, [s for s in shapes if math.prod(s[1]) >= OUT * IN]
    assert largest <= max(TOKENS, width) * max(OUT, IN)  # O((m + n)(r + p)) plus one batch


def test_allocation_recorder_catches_the_dense_path():
    """Positive control: the exact path allocates ``G (out, in)`` and the recorder sees it."""
    shapes, largest = _largest_allocation("exact")
    assert largest >= OUT * IN
    assert any(shape == (OUT, IN) for _, shape in shapes)


def _peso_r_engine(model, source: str) -> Engine:
    from pesocli.methods.peso_r import PesoRConfig

    method = METHODS["peso-r"](PesoRConfig(rank=RANK, alpha=8.0, restart_every=3))
    method.setup(total_steps=10, steps_per_epoch=10)
    return Engine(model, method, FullGradConfig(source=source))


def test_previous_step_source_sketches_the_step_before_a_restart(make_tiny_model, token_batch):
    """``fullgrad.source: previous-step``: the training step before the restart carries the range
    finder; the restart then runs no pass of its own and gets the same sketch a pass would give."""
    from pesocli.optim import PesoAdamW

    model = make_tiny_model("llama")
    engine = _peso_r_engine(model, "previous-step")

    def run_pass() -> None:
        model(token_batch, labels=token_batch).loss.backward()

    with engine.training_step(1):  # no restart before step 2: nothing sketched
        run_pass()
    assert engine._pending is None
    with engine.training_step(2):
        run_pass()
    step, sketched = engine._pending
    assert step == 3 and set(sketched) == set(engine.layers)
    assert all(layer.probe is None for layer in engine.layers.values())
    rank = engine.method.sketch_rank()
    reference = estimate_full_gradients(engine.layers, run_pass, rank, FullGradConfig())
    for name, estimate in reference.items():
        torch.testing.assert_close(sketched[name].basis, estimate.basis, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sketched[name].coefficients, estimate.coefficients, atol=1e-6, rtol=1e-4)
    calls = []
    records = engine.maybe_restart(3, PesoAdamW(engine.trainable_parameters()), lambda: calls.append(1))
    assert calls == [] and records and engine._pending is None


def test_previous_step_source_falls_back_to_a_restart_pass(make_tiny_model, token_batch):
    """Two micro-batches in the step (gradient accumulation): the sum is not what one backward
    sees, so the restart runs its own pass."""
    from pesocli.optim import PesoAdamW

    model = make_tiny_model("llama")
    engine = _peso_r_engine(model, "previous-step")
    with engine.training_step(2):
        for half in token_batch.chunk(2):
            model(half, labels=half).loss.backward()
    assert engine._pending is None
    calls = []

    def run_pass() -> None:
        calls.append(1)
        model(token_batch, labels=token_batch).loss.backward()

    engine.maybe_restart(3, PesoAdamW(engine.trainable_parameters()), run_pass)
    assert calls == [1]


def test_source_is_validated():
    assert FullGradConfig(source="previous-step").validate() == []
    assert "fullgrad.source" in " ".join(FullGradConfig(source="later").validate())
    assert "sketch" in " ".join(FullGradConfig(source="previous-step", mode="exact").validate())


def test_trainer_with_previous_step_source_restarts_without_passes(tmp_path, monkeypatch, train_embedded):
    """The trainer hands its step number to ``training_step``: with ``source: previous-step`` every
    restart after step 0 takes the sketch of the step before (no restart pass), and training works."""
    import json

    import pesocli.engine as engine_module
    estimates_calls = []
    original = engine_module.estimate_full_gradients

    def counting(*args, **kwargs):
        estimates_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "estimate_full_gradients", counting)
    overrides = {
        "method.name": "peso-r",
        "method.restart_every": 10,
        "fullgrad.source": "previous-step",
        "train.max_steps": 40,
        "train.batch_size": 8,
        "train.eval_every": 0,
        "train.export": "none",
    }
    result = train_embedded(tmp_path, overrides)
    restarts = [json.loads(line) for line in (result.run_dir / "restarts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in restarts}) == [1, 11, 21, 31]  # 1-based
    assert estimates_calls == [1]  # only step 0's restart ran a pass: no step precedes it
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
