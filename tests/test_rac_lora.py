"""RAC-LoRA: one factor random and frozen per link, the other trained from zero, merged at link end.

The dense reference of a step: with ``lora_A`` frozen, AdamW's first update of ``lora_B`` is
``-lr g / (|g| + eps)`` (bias-corrected moments of one gradient), ``g = s G lora_A^T``, so
``W <- W - s lr (g / (|g| + eps)) lora_A``; with ``lora_B`` frozen, ``g = s lora_B^T G`` and
``W <- W - s lr lora_B (g / (|g| + eps))``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.methods.base import RestartContext
from pesocli.methods.rac_lora import OneSidedDelta, RacLoRA, RacLoRAConfig
from pesocli.optim import PesoAdamW
from pesocli.synthetic import SyntheticProblem, run

OUT, IN, R = 13, 9, 3
ALPHA = 6.0


def _layer(method):
    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    return AdaptedLinear(base, method.build_delta(OUT, IN), LowRankAnchor(OUT, IN))


def _link(method, layers, optimizer, step):
    return method.restart(RestartContext(step=step, layers=layers, optimizer=optimizer, gradients=None))


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_a_step_moves_w_by_the_projected_adam_step(frozen):
    method = RacLoRA(RacLoRAConfig(rank=R, alpha=ALPHA, frozen=frozen, restart_every=5))
    layer = _layer(method)
    lr, eps = 0.01, 1e-8
    optimizer = PesoAdamW(list(layer.delta.parameters()), lr=lr, eps=eps, weight_decay=0.0)
    _link(method, {"l": layer}, optimizer, 0)
    delta: OneSidedDelta = layer.delta
    trained = "lora_B" if frozen == "lora_A" else "lora_A"
    assert delta.frozen == frozen and delta.trained == trained
    assert float(getattr(delta, trained).detach().abs().max()) == 0.0  # starts at zero: W unchanged
    bound = 1 / math.sqrt(IN if frozen == "lora_A" else OUT)
    assert 0.5 * bound < float(getattr(delta, frozen).detach().abs().max()) <= bound

    x, target = torch.randn(6, IN), torch.randn(6, OUT)
    w0 = effective_weight(layer, delta.weight()).double()
    y = layer(x)
    y.retain_grad()
    ((y - target) ** 2).sum().backward()
    assert getattr(delta, frozen).grad is None  # detached: AdamW skips it
    g_dense = y.grad.double().T @ x.double()
    optimizer.step()
    s = delta.scale
    lora_a, lora_b = delta.lora_A.detach().double(), delta.lora_B.detach().double()
    if frozen == "lora_A":
        g = s * g_dense @ lora_a.T
        expected = w0 - s * lr * (g / (g.abs() + eps)) @ lora_a
    else:
        g = s * lora_b.T @ g_dense
        expected = w0 - s * lr * lora_b @ (g / (g.abs() + eps))
    torch.testing.assert_close(effective_weight(layer, delta.weight()).double(), expected,
                               atol=1e-6, rtol=1e-5)


def test_a_link_merges_exactly_redraws_and_resets_adamw():
    method = RacLoRA(RacLoRAConfig(rank=R, alpha=ALPHA, restart_every=4, seed=7))
    method.setup(total_steps=12, steps_per_epoch=12)
    assert [s for s in range(12) if method.restart_due(s)] == [0, 4, 8]
    layers = {f"l{i}": _layer(method) for i in range(8)}
    params = [p for layer in layers.values() for p in layer.delta.parameters()]
    optimizer = PesoAdamW(params, lr=0.01)
    first = _link(method, layers, optimizer, 0)
    assert all(r.anchor_rank == 0 and r.kind == "link" for r in first)  # nothing to merge at step 0
    assert {r.extra["frozen"] for r in first} == {"lora_A", "lora_B"}  # a coin per layer
    for layer in layers.values():  # some training: the trained factor moves
        getattr(layer.delta, layer.delta.trained).data.normal_()
        for param in (layer.delta.lora_A, layer.delta.lora_B):
            optimizer.moments(param)[0].fill_(1.0)
    before = {n: effective_weight(layer, layer.delta.weight()).clone() for n, layer in layers.items()}
    frozen_before = {n: getattr(v.delta, v.delta.frozen).detach().clone() for n, v in layers.items()}
    records = _link(method, layers, optimizer, 4)
    for (name, layer), record in zip(layers.items(), records, strict=True):
        torch.testing.assert_close(effective_weight(layer, layer.delta.weight()), before[name],
                                   atol=1e-6, rtol=1e-5)
        assert layer.anchor.rank == R and record.anchor_rank == R
        assert len(record.extra["absorbed_singular_values"]) == R
        assert float(getattr(layer.delta, layer.delta.trained).detach().abs().max()) == 0.0
        assert not torch.equal(getattr(layer.delta, layer.delta.frozen).detach(), frozen_before[name])
        assert all(optimizer.step_count(p) == 0 and float(optimizer.moments(p)[0].abs().max()) == 0.0
                   for p in (layer.delta.lora_A, layer.delta.lora_B))
    assert method.state_dict() == {"links_done": 2}


def test_the_chain_is_reproducible_and_the_side_travels_with_the_tensors():
    def draw(seed):
        method = RacLoRA(RacLoRAConfig(rank=R, alpha=ALPHA, seed=seed))
        layers = {f"l{i}": _layer(method) for i in range(3)}
        _link(method, layers, PesoAdamW([p for v in layers.values() for p in v.delta.parameters()]), 0)
        return [(v.delta.frozen, getattr(v.delta, v.delta.frozen).detach().clone()) for v in layers.values()]

    for (side_a, tensor_a), (side_b, tensor_b) in zip(draw(3), draw(3), strict=True):
        assert side_a == side_b and torch.equal(tensor_a, tensor_b)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(draw(3), draw(4), strict=True))

    source = OneSidedDelta(OUT, IN, R, 2.0, trained="lora_A")
    resumed = OneSidedDelta(OUT, IN, R, 2.0, trained="lora_B")
    assert resumed.trained == "lora_B"
    with torch.no_grad():  # what a resume does: copy every saved parameter
        for name, param in resumed.named_parameters():
            param.copy_(dict(source.named_parameters())[name])
    assert resumed.trained == "lora_A"


def test_rac_lora_goes_below_lora_on_appendix_a():
    small = SyntheticProblem(n=32, rank=4, steps=600, lr=0.2)
    assert run("rac-lora", small)[-1] < 0.1 * small.a**2  # links every K = 10 steps


def test_trains_the_embedded_default(tmp_path: Path, train_embedded):
    result = train_embedded(tmp_path, {
        "method.name": "rac-lora", "train.max_steps": 40, "method.restart_every": 15, "train.batch_size": 16,
        "train.eval_every": 0})
    assert result.final_loss < 0.8 * result.initial_loss and result.restarts == 3
    lines = (tmp_path / "run" / "restarts.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 14  # one record per layer and link (2 blocks x 7 projections)
