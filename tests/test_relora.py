"""ReLoRA: merge the adapter into the anchor, re-draw it as LoRA does, prune or reset AdamW, re-warm the lr.

Dense references: the anchor of a layer equals the sum of every merged ``scale * lora_B @ lora_A``;
pruning keeps exactly the ``n - floor(prune_ratio * n)`` entries a sort by magnitude ranks first;
the scheduler's lr is ``lr * lr_factor(step) * j / W`` for the ``j < W`` steps after a restart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_export import TOL, model_logits, rel, reload, tokens
from torch import nn

from pesocli.cli import main
from pesocli.engine import Engine
from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.methods.base import RestartContext
from pesocli.methods.relora import ReLoRA, ReLoRAConfig, prune_by_magnitude_
from pesocli.optim import PesoAdamW
from pesocli.runs import load_run
from pesocli.train.lr import lr_factor

OUT, IN, R = 13, 9, 3
ALPHA = 6.0


def _layers(method: ReLoRA, count: int = 3, anchor_mode: str = "lowrank", rank_cap: int = 256):
    layers = {}
    for i in range(count):
        base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
        anchor = LowRankAnchor(OUT, IN, mode=anchor_mode, rank_cap=rank_cap)
        layers[f"l{i}"] = AdaptedLinear(base, method.build_delta(OUT, IN), anchor)
    return layers


def _optimizer(layers) -> PesoAdamW:
    return PesoAdamW([p for layer in layers.values() for p in layer.delta.parameters()], lr=0.01)


def _train_a_little(layers, optimizer: PesoAdamW, steps: int = 3) -> None:
    """Real AdamW steps on a regression loss: both factors move and both moments fill."""
    x, target = torch.randn(16, IN), torch.randn(16, OUT)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        sum(((layer(x) - target) ** 2).mean() for layer in layers.values()).backward()
        optimizer.step()


def _restart(method: ReLoRA, layers, optimizer: PesoAdamW, step: int):
    assert method.restart_due(step)
    return method.restart(RestartContext(step=step, layers=layers, optimizer=optimizer, gradients=None))


def test_a_restart_merges_exactly_and_redraws_the_adapter_as_lora_does():
    method = ReLoRA(ReLoRAConfig(rank=R, alpha=ALPHA, restart_every=4))
    method.setup(total_steps=12, steps_per_epoch=12)
    assert [s for s in range(12) if method.restart_due(s)] == [4, 8]  # never step 0
    layers = _layers(method)
    optimizer = _optimizer(layers)
    _train_a_little(layers, optimizer)
    x = torch.randn(5, IN)
    before = {n: layer(x).detach() for n, layer in layers.items()}
    products = {n: layer.delta.weight().detach().clone() for n, layer in layers.items()}
    old_a = {n: layer.delta.lora_A.detach().clone() for n, layer in layers.items()}
    params = {n: (layer.delta.lora_A, layer.delta.lora_B) for n, layer in layers.items()}

    records = _restart(method, layers, optimizer, 4)
    bound = 1 / math.sqrt(IN)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    for (name, layer), record in zip(layers.items(), records, strict=True):
        torch.testing.assert_close(layer(x).detach(), before[name], atol=1e-6, rtol=1e-6)
        assert float(layer.delta.lora_B.detach().abs().max()) == 0.0
        assert not torch.equal(layer.delta.lora_A.detach(), old_a[name])
        assert 0.5 * bound < float(layer.delta.lora_A.detach().abs().max()) <= bound
        assert layer.delta.lora_A is params[name][0] and layer.delta.lora_B is params[name][1]  # AdamW's
        torch.testing.assert_close(layer.anchor.materialize(), products[name], atol=1e-6, rtol=1e-6)
        assert layer.anchor.rank == R and record.anchor_rank == R and record.kind == "restart"
        assert record.extra["restart"] == 1
        assert record.extra["merged_norm"] == pytest.approx(float(products[name].norm()), rel=1e-5)
    assert method.state_dict() == {"restarts_done": 1}


def test_a_restart_leaves_a_tiny_models_logits_unchanged(make_tiny_model, token_batch):
    model = make_tiny_model("llama")
    method = ReLoRA(ReLoRAConfig(rank=4, alpha=8.0, restart_every=2))
    method.setup(total_steps=6, steps_per_epoch=6)
    engine = Engine(model, method)
    optimizer = PesoAdamW(engine.trainable_parameters(), lr=1e-2)
    for step in range(2):
        assert engine.maybe_restart(step, optimizer, lambda: None) == []
        optimizer.zero_grad(set_to_none=True)
        model(token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        before = model(token_batch).logits
        records = engine.maybe_restart(2, optimizer, lambda: None)
        after = model(token_batch).logits
    assert {r.layer for r in records} == set(engine.layers)
    assert all(layer.anchor.rank == 4 for layer in engine.layers.values())
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("anchor_mode, rank_cap", [("lowrank", 256), ("lowrank", 4), ("dense", 256)])
def test_the_anchor_is_the_sum_of_every_merged_product(anchor_mode: str, rank_cap: int):
    method = ReLoRA(ReLoRAConfig(rank=R, alpha=ALPHA, restart_every=3, anchor_mode=anchor_mode))
    method.setup(total_steps=12, steps_per_epoch=12)
    layers = _layers(method, anchor_mode=anchor_mode, rank_cap=rank_cap)  # cap 4: re-compressed each time
    optimizer = _optimizer(layers)
    w0 = {n: effective_weight(layer, torch.zeros(OUT, IN)).double() for n, layer in layers.items()}
    merged = {n: torch.zeros(OUT, IN, dtype=torch.float64) for n in layers}
    for step in (3, 6, 9):
        _train_a_little(layers, optimizer)
        for name, layer in layers.items():
            merged[name] += layer.delta.weight().detach().double()
        _restart(method, layers, optimizer, step)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.anchor.materialize().double(), merged[name], atol=1e-6, rtol=1e-6)
        total = effective_weight(layer, layer.delta.weight().detach()).double()
        torch.testing.assert_close(total, w0[name] + merged[name], atol=1e-6, rtol=1e-6)
    assert method.restarts_done == 3


@pytest.mark.parametrize("ratio, n, kept", [(0.9, 100, 10), (0.999, 256, 1), (0.29, 100, 71), (0.5, 7, 4),
                                            (0.0, 30, 30), (1.0, 30, 0)])
def test_pruning_keeps_exactly_the_largest_entries(ratio: float, n: int, kept: int):
    tensor = torch.randn(n, generator=torch.Generator().manual_seed(n)).reshape(-1, 1)
    original = tensor.clone()
    assert prune_by_magnitude_(tensor, ratio) == kept
    order = original.flatten().abs().argsort(descending=True)  # dense reference: sort by magnitude
    top = torch.zeros(n, dtype=torch.bool)
    top[order[:kept]] = True
    assert torch.equal(tensor.flatten()[top], original.flatten()[top])
    assert int((tensor.flatten()[~top] != 0).sum()) == 0


def test_prune_keeps_each_moments_top_fraction_and_the_step_count():
    method = ReLoRA(ReLoRAConfig(rank=R, alpha=ALPHA, restart_every=5, prune_ratio=0.9))
    layers = _layers(method, count=2)
    optimizer = _optimizer(layers)
    _train_a_little(layers, optimizer, steps=4)
    params = [p for layer in layers.values() for p in (layer.delta.lora_A, layer.delta.lora_B)]
    moments = {id(p): [m.clone() for m in optimizer.moments(p)] for p in params}
    records = _restart(method, layers, optimizer, 5)
    for param in params:
        assert optimizer.step_count(param) == 4
        (first, second), (old_first, old_second) = optimizer.moments(param), moments[id(param)]
        keep = second.numel() - math.floor(0.9 * second.numel())
        reference_second, reference_first = old_second.clone(), old_first.clone()
        prune_by_magnitude_(reference_second, 0.9)
        prune_by_magnitude_(reference_first, 0.9)
        assert torch.equal(second, reference_second) and int((second != 0).sum()) == keep
        # each moment's top fraction, and no first moment where the second was pruned (Adam: m / eps)
        assert torch.equal(first, reference_first * (reference_second != 0))
        assert not bool(((first != 0) & (second == 0)).any())
        assert float(second.abs().max()) == float(old_second.abs().max())
    zero = sum(int((m == 0).sum()) for p in params[:2] for m in optimizer.moments(p))
    total = sum(m.numel() for p in params[:2] for m in optimizer.moments(p))
    assert records[0].extra["pruned_fraction"] == pytest.approx(zero / total)
    assert 0.85 < records[0].extra["pruned_fraction"] < 0.95


def test_reset_empties_the_state():
    method = ReLoRA(ReLoRAConfig(rank=R, alpha=ALPHA, restart_every=5, optimizer_reset="reset"))
    layers = _layers(method, count=2)
    optimizer = _optimizer(layers)
    _train_a_little(layers, optimizer)
    params = [p for layer in layers.values() for p in (layer.delta.lora_A, layer.delta.lora_B)]
    assert all(p in optimizer.state for p in params)
    records = _restart(method, layers, optimizer, 5)
    assert not any(p in optimizer.state for p in params)
    assert {r.extra["pruned_fraction"] for r in records} == {1.0}


def test_a_non_finite_adapter_is_left_for_the_trainers_guard():
    method = ReLoRA(ReLoRAConfig(rank=R, alpha=ALPHA, restart_every=5, anchor_mode="dense"))
    layers = _layers(method, count=1, anchor_mode="dense")
    optimizer = _optimizer(layers)
    _train_a_little(layers, optimizer)
    layer = layers["l0"]
    with torch.no_grad():
        layer.delta.lora_B[0, 0] = float("nan")
    (record,) = _restart(method, layers, optimizer, 5)
    assert record.extra["skipped"] == "non-finite adapter"
    assert layer.anchor.is_zero and float(layer.anchor.weight.abs().max()) == 0.0  # nothing written
    assert math.isnan(float(layer.delta.lora_B.detach()[0, 0]))  # still there for the guard to find


def test_the_lr_multiplier_ramps_from_zero_after_each_restart_and_is_one_elsewhere():
    method = ReLoRA(ReLoRAConfig(restart_every=6, restart_warmup_steps=3))
    method.setup(total_steps=20, steps_per_epoch=20)
    ramp = {6: 0.0, 7: 1 / 3, 8: 2 / 3, 12: 0.0, 13: 1 / 3, 14: 2 / 3, 18: 0.0, 19: 1 / 3}
    expected = [ramp.get(s, 1.0) for s in range(20)]
    assert [method.lr_multiplier(s) for s in range(20)] == pytest.approx(expected)

    clipped = ReLoRA(ReLoRAConfig(restart_every=4, restart_warmup_steps=50))  # W clipped to K = 4
    clipped.setup(total_steps=12, steps_per_epoch=12)
    expected = [1.0] * 4 + [0.0, 0.25, 0.5, 0.75] * 2
    assert [clipped.lr_multiplier(s) for s in range(12)] == pytest.approx(expected)

    annealed = ReLoRA(ReLoRAConfig(restart_every=6, restart_warmup_steps=2, restart_anneal_steps=3))
    annealed.setup(total_steps=12, steps_per_epoch=12)  # axolotl: j / A at j steps before a restart
    expected = [1, 1, 1, 1, 2 / 3, 1 / 3, 0, 1 / 2, 1, 1, 1, 1]  # no restart at 12: no anneal before it
    assert [annealed.lr_multiplier(s) for s in range(12)] == pytest.approx(expected)

    per_epoch = ReLoRA(ReLoRAConfig(restart_every=None, restarts_per_epoch=2, restart_warmup_steps=2))
    per_epoch.setup(total_steps=16, steps_per_epoch=8)
    assert [s for s in range(16) if per_epoch.restart_due(s)] == [4, 8, 12]
    assert [per_epoch.lr_multiplier(s) for s in (3, 4, 5, 6, 8, 9, 12)] == [1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 0.0]


def test_config_rejects_bad_values():
    errors = ReLoRAConfig(restart_every=None, restart_warmup_steps=-1, optimizer_reset="zero",
                          prune_ratio=1.5).validate()
    assert len(errors) == 4
    assert ReLoRAConfig().validate() == []
    assert (ReLoRAConfig().optimizer_reset, ReLoRAConfig().prune_ratio) == ("prune", 0.999)


# ------------------------------------------------------------------------- through the real trainer

RUN = {"method.name": "relora", "train.max_steps": 40, "train.batch_size": 16, "train.eval_every": 0,
       "train.log_every": 1, "method.restart_every": 15, "method.restart_warmup_steps": 5,
       "optim.lr": 1e-2, "optim.scheduler": "cosine", "optim.warmup_ratio": 0.03}


@pytest.fixture(scope="module")
def relora_run(tmp_path_factory: pytest.TempPathFactory, train_embedded):
    out = tmp_path_factory.mktemp("relora")
    return train_embedded(out, RUN), out / "run"


def test_trains_the_embedded_default_with_a_jagged_lr(relora_run):
    result, run = relora_run
    assert result.final_loss < 0.8 * result.initial_loss and result.restarts == 2
    lines = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 14  # one record per layer and restart (2 blocks x 7 projections)
    assert {r["step"] for r in lines} == {16, 31} and {r["kind"] for r in lines} == {"restart"}
    assert all(r["extra"]["merged_norm"] > 0 and 0.99 < r["extra"]["pruned_fraction"] < 1 for r in lines)
    lrs = {r["step"] - 1: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    assert sorted(lrs) == list(range(40))
    warm = {15 + j: j / 5 for j in range(5)} | {30 + j: j / 5 for j in range(5)}
    expected = [1e-2 * lr_factor(s, total_steps=40, warmup_steps=2, kind="cosine") * warm.get(s, 1.0)
                for s in range(40)]
    assert [lrs[s] for s in range(40)] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[15] == 0.0 and lrs[30] == 0.0 and lrs[14] > lrs[19] > lrs[16] > 0


def test_peso_export_of_a_relora_run_reloads_to_the_trained_logits(relora_run, tmp_path: Path):
    _, run = relora_run
    trained = load_run(run)
    assert all(layer.anchor.rank > 0 for layer in trained.engine.layers.values())
    ids = tokens()
    reference = model_logits(trained.model, ids)
    folders = {"anchored": ("model", "adapter"), "adapter": ("base", "."), "merged": (".", None)}
    for fmt, (model_folder, adapter_folder) in folders.items():
        out = tmp_path / fmt
        result = CliRunner().invoke(main, ["export", str(run), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0, result.output
        model = reload(out / model_folder, out / adapter_folder if adapter_folder else None)
        assert rel(model_logits(model, ids), reference) < TOL, fmt
    assert json.loads((tmp_path / "merged" / "peso_export.json").read_text())["method"] == "relora"
