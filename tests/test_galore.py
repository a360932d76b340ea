"""GaLore as a PESO strategy against a dense GaLore step written here.

Dense reference (GaLore's ``GaLoreProjector`` + AdamW, one step after a subspace update, exact SVD):
left (``out < in``): ``P = U_r`` of ``G``, ``R = P^T G``; right (``out >= in``): ``Q = V_r^T``,
``R = G Q^T``. AdamW's first update of ``R`` is ``lr R / (|R| + eps)`` (``R`` times the delta's
scale is what our parameter's gradient is, and Adam's first step does not see the factor) and
``W <- W - scale * project_back(update)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pesocli.fullgrad import DenseGradient
from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.linalg import principal_angles_deg
from pesocli.methods.base import RestartContext
from pesocli.methods.galore import GaLore, GaLoreConfig
from pesocli.optim import PesoAdamW
from pesocli.synthetic import SyntheticProblem, run

R = 3
SCALE = 0.5


def _setup(out_features, in_features, **options):
    method = GaLore(GaLoreConfig(rank=R, galore_scale=SCALE, restart_every=5, **options))
    base = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    layer = AdaptedLinear(base, method.build_delta(out_features, in_features),
                          LowRankAnchor(out_features, in_features))
    return method, layer


def _dense_gradient(layer, x, target):
    y = layer(x)
    y.retain_grad()
    ((y - target) ** 2).sum().backward()
    for param in layer.delta.parameters():
        param.grad = None
    return (y.grad.T @ x).detach()


def _subspace_update(method, layer, optimizer, gradient, step):
    ctx = RestartContext(step=step, layers={"l": layer}, optimizer=optimizer,
                         gradients={"l": DenseGradient(gradient)})
    return method.restart(ctx)


@pytest.mark.parametrize(("out_features", "in_features", "side"), [(13, 9, "right"), (9, 13, "left")])
def test_one_step_matches_the_dense_galore_step(out_features, in_features, side):
    method, layer = _setup(out_features, in_features)
    lr, eps = 0.01, 1e-8
    optimizer = PesoAdamW(list(layer.delta.parameters()), lr=lr, eps=eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(8, in_features, generator=gen), torch.randn(8, out_features, generator=gen)
    g0 = _dense_gradient(layer, x, target)
    (record,) = _subspace_update(method, layer, optimizer, g0, 0)
    assert (record.kind, record.extra["side"], record.principal_angle_deg) == ("subspace", side, None)
    u, s, vh = torch.linalg.svd(g0.double(), full_matrices=False)
    assert record.top_singular_values == pytest.approx(s[:R].tolist(), rel=1e-5)
    assert record.captured_energy == pytest.approx(float(s[:R].pow(2).sum() / s.pow(2).sum()), rel=1e-5)

    w0 = effective_weight(layer, layer.delta.weight()).double()
    y = layer(x)
    ((y - target) ** 2).sum().backward()
    frozen = layer.delta.frozen
    assert getattr(layer.delta, frozen).grad is None
    optimizer.step()
    g = g0.double()  # the weights have not moved since the SVD: the same gradient
    if side == "left":
        p = u[:, :R]
        projected = p.T @ g
        expected = w0 - SCALE * p @ (lr * projected / (projected.abs() * SCALE + eps) * SCALE)
    else:
        q = vh[:R]
        projected = g @ q.T
        expected = w0 - SCALE * (lr * projected / (projected.abs() * SCALE + eps) * SCALE) @ q
    torch.testing.assert_close(effective_weight(layer, layer.delta.weight()).double(), expected,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("moments", ["keep", "rotate", "reset"])
def test_a_subspace_update_absorbs_into_the_anchor_and_handles_the_moments(moments):
    method, layer = _setup(9, 13, moments=moments)  # left: P = lora_B (9, r), R = lora_A (r, 13)
    optimizer = PesoAdamW(list(layer.delta.parameters()), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    _subspace_update(method, layer, optimizer, torch.randn(9, 13, generator=gen), 0)
    delta = layer.delta
    with torch.no_grad():
        delta.lora_A.normal_()
    m, _ = optimizer.moments(delta.lora_A)
    m.normal_()
    optimizer.state[delta.lora_A]["step"] += 3
    m_before, p_old = m.clone(), delta.lora_B.detach().clone()
    before = effective_weight(layer, delta.weight()).clone()
    (record,) = _subspace_update(method, layer, optimizer, torch.randn(9, 13, generator=gen), 5)
    torch.testing.assert_close(effective_weight(layer, delta.weight()), before, atol=1e-6, rtol=1e-5)
    assert layer.anchor.rank == R and float(delta.lora_A.detach().abs().max()) == 0.0
    p_new = delta.lora_B.detach()
    torch.testing.assert_close(p_new.T @ p_new, torch.eye(R), atol=1e-5, rtol=1e-5)
    assert record.principal_angle_deg == pytest.approx(float(principal_angles_deg(p_old, p_new).max()))
    if moments == "keep":  # GaLore's code: the projected moments carry over unchanged
        torch.testing.assert_close(optimizer.moments(delta.lora_A)[0], m_before)
        assert optimizer.step_count(delta.lora_A) == 3
    elif moments == "rotate":
        torch.testing.assert_close(optimizer.moments(delta.lora_A)[0], (p_new.T @ p_old) @ m_before)
    else:
        assert delta.lora_A not in optimizer.state


def test_projection_side_follows_galore():
    sides = {(13, 9): "lora_B", (9, 13): "lora_A", (8, 8): "lora_B"}  # right when out >= in
    for (out_features, in_features), trained in sides.items():
        method, layer = _setup(out_features, in_features)
        assert layer.delta.trained == trained
    assert _setup(13, 9, proj_side="left")[1].delta.trained == "lora_A"
    assert GaLoreConfig().scale == 1.0 and GaLoreConfig(galore_scale=0.25, alpha=16.0).scale == 0.25


def test_galore_goes_far_below_lora_on_appendix_a():
    small = SyntheticProblem(n=32, rank=4, steps=600, lr=0.2)
    assert run("galore", small)[-1] < 1e-3 * small.a**2  # subspace updates every K = 10 steps


def test_trains_the_embedded_default(tmp_path: Path, train_embedded):
    result = train_embedded(tmp_path, {
        "method.name": "galore", "method.restart_every": 15, "train.max_steps": 40, "train.batch_size": 16,
        "train.eval_every": 0})
    assert result.final_loss < 0.8 * result.initial_loss and result.restarts == 3
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "restarts.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"subspace"} and len(records) == 3 * 14
    assert all(0 < r["captured_energy"] <= 1 + 1e-6 for r in records)
