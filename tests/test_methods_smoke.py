"""Every registered method trains every tiny family (GQA) through the Engine: the loss goes down.

``family`` is the parametrised fixture from ``conftest.py`` (llama, qwen2, mistral).

Shared contract checks run over the table ``METHODS x FAMILIES``; a new method is covered as soon
as it is registered. Per-method options (for example a short restart period so that a later
restart happens inside the run) go in :data:`OPTIONS`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pesocli.engine import Engine
from pesocli.fullgrad import FullGradConfig
from pesocli.methods import METHODS
from pesocli.optim import PesoAdamW

STEPS = 8
OPTIONS: dict[str, dict] = {
    "peso-r": {"restart_every": 3},  # restarts before steps 0, 3 and 6: two aligned restarts
    "relora": {"restart_every": 3},  # merges and re-draws before steps 3 and 6
}
"""Method options on top of ``rank=4, alpha=8``; only fields the method's Config has are used."""


def _method(name: str):
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    options = {"rank": 4, "alpha": 8.0, **OPTIONS.get(name, {})}
    unknown = set(options) - fields
    assert not unknown, f"{name}: OPTIONS names fields its Config lacks: {unknown}"
    method = cls(cls.Config(**options))
    method.setup(total_steps=STEPS, steps_per_epoch=STEPS)
    return method


@pytest.mark.parametrize("method_name", list(METHODS))
def test_few_steps_decrease_the_loss(make_tiny_model, token_batch, family, method_name):
    model = make_tiny_model(family)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = _method(method_name)
    engine = Engine(model, method, FullGradConfig(oversample=4, power_iters=1))
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        return model(token_batch, labels=token_batch).loss

    def run_pass() -> None:
        loss_fn().backward()

    def gradient_pass() -> float:
        loss = loss_fn()
        loss.backward()
        return loss.item()

    losses, restarts = [], []
    for step in range(STEPS):
        records = engine.maybe_restart(step, optimizer, run_pass)
        if records:
            restarts.append(step)
            assert {r.layer for r in records} == set(engine.layers)
        losses.append(engine.step(optimizer, step, gradient_pass))  # the trainer's step order and hooks
    with torch.no_grad():
        final = float(loss_fn())

    assert all(torch.isfinite(torch.tensor(losses + [final])))
    assert final < losses[0] - 0.05, (losses, final)
    if method_name == "peso-r":
        assert restarts == [0, 3, 6]
        assert any(layer.anchor.rank > 0 for layer in engine.layers.values())
    # the backbone is never written: every pre-existing parameter is bit-identical
    after = dict(model.named_parameters())
    for name, value in base_before.items():
        adapted_name = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        current = after.get(name, after.get(adapted_name))
        assert current is not None, name
        torch.testing.assert_close(current.detach(), value, atol=0, rtol=0)

