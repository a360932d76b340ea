"""What bounds the anchor's cost (issue 18): lossy truncation by energy or rank, a BF16 anchor, and
folding the anchor into the base (Algorithm 2 line 4 as written). Each is checked against a dense
reference (exact SVD of the materialised anchor, ``W0 + anchor`` in FP64); a short peso-r run per
option trains, saves, reloads and exports to the trained logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pesocli.cli import main
from pesocli.config import embedded_config_path, load_config
from pesocli.errors import ConfigError
from pesocli.export import ExportOptions, check_path, export_run
from pesocli.inspect.runlog import read_run_log
from pesocli.inspect.summary import summarize
from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.methods.lora import LoRADelta
from pesocli.runs import load_run
from pesocli.train import run_training
from pesocli.train.state import collect_tensors, load_layer_tensors

OUT, IN = 37, 29


def _pieces(count: int, rank: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random rank-``rank`` products with decaying scales (so truncation has a tail to drop)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(OUT, rank, generator=g) * 0.7**i, torch.randn(rank, IN, generator=g))
        for i in range(count)
    ]


def _best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_keep_energy_keeps_the_fewest_svd_components_and_reports_the_rest() -> None:
    anchor = LowRankAnchor(OUT, IN, keep_energy=0.9)
    reference = torch.zeros(OUT, IN, dtype=torch.float64)
    for up, down in _pieces(3):
        before = reference + (up @ down).double()
        anchor.absorb(up, down)
        energy = torch.linalg.svdvals(before).pow(2)
        k = int((energy.cumsum(0) < 0.9 * energy.sum()).sum()) + 1
        reference = _best_rank_k(before, k)
        assert anchor.rank == k
        torch.testing.assert_close(anchor.materialize().double(), reference, rtol=1e-5, atol=1e-5)
        dropped = float(energy[k:].sum() / energy.sum())
        assert 0 < dropped <= 0.1
        assert anchor.take_dropped_energy() == pytest.approx(dropped, rel=1e-4)
        assert anchor.take_dropped_energy() == 0.0  # read once


def test_keep_energy_of_one_component_piece_is_exact() -> None:
    # a single rank-1 absorb holds all its energy in one component: nothing is dropped
    anchor = LowRankAnchor(OUT, IN, keep_energy=0.5)
    up, down = torch.randn(OUT, 1), torch.randn(1, IN)
    anchor.absorb(up, down)
    torch.testing.assert_close(anchor.materialize(), up @ down, rtol=1e-5, atol=1e-5)
    assert anchor.take_dropped_energy() == pytest.approx(0.0, abs=1e-7)


def test_max_rank_bounds_the_rank_with_the_best_approximation_at_every_absorb() -> None:
    anchor = LowRankAnchor(OUT, IN, max_rank=6)
    reference = torch.zeros(OUT, IN, dtype=torch.float64)
    for up, down in _pieces(5):
        before = reference + (up @ down).double()
        anchor.absorb(up, down)
        reference = _best_rank_k(before, 6)
        assert anchor.rank <= 6
        torch.testing.assert_close(anchor.materialize().double(), reference, rtol=1e-4, atol=1e-5)
        dropped = float((before - reference).pow(2).sum() / before.pow(2).sum())
        assert anchor.take_dropped_energy() == pytest.approx(dropped, rel=1e-3, abs=1e-9)


def test_bf16_anchor_stores_bf16_and_computes_an_fp32_layer_in_fp32() -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    delta = LoRADelta(OUT, IN, 3, scale=2.0)
    with torch.no_grad():
        delta.lora_B.normal_()
    anchor = LowRankAnchor(OUT, IN, dtype=torch.bfloat16)
    fp32 = LowRankAnchor(OUT, IN)
    for up, down in _pieces(3):
        anchor.absorb(up, down)
        fp32.absorb(up, down)
    assert anchor.up.dtype == anchor.down.dtype == torch.bfloat16
    # storage rounding only: relative difference to the FP32 anchor about bf16's 2^-8
    gap = (anchor.materialize().float() - fp32.materialize()).norm() / fp32.materialize().norm()
    assert 1e-5 < float(gap) < 2e-2
    layer = AdaptedLinear(base, delta, anchor)
    x = torch.randn(3, 5, IN, dtype=torch.float64).float()
    y = layer(x)
    assert y.dtype == torch.float32
    reference = x.double() @ effective_weight(layer, delta.weight()).double().T + base.bias.double()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)  # FP32 arithmetic, not BF16
    # the adapter's gradient is the FP32 one of the dense reference
    y.pow(2).sum().backward()
    grad = delta.lora_B.grad.clone()
    delta.lora_B.grad = None
    w = effective_weight(layer, delta.weight())  # W0 + anchor (FP32) + Delta W, with Delta W's graph
    (x @ w.T + base.bias).pow(2).sum().backward()
    torch.testing.assert_close(grad, delta.lora_B.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_writes_w0_plus_anchor_into_the_base_rounded_once_per_absorb(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(dtype)
    w0 = base.weight.detach().double().clone()
    anchor = LowRankAnchor(OUT, IN, mode="fold")
    anchor.fold_into(base)
    factored = LowRankAnchor(OUT, IN)
    expect = base.weight.detach().clone()
    for up, down in _pieces(4):
        up, down = up * 1e-2, down  # restart-sized updates: small beside W0
        anchor.absorb(up, down)
        factored.absorb(up, down)
        expect = (expect.float() + up @ down).to(dtype)
    assert anchor.rank == 0 and anchor.is_zero and anchor.folded
    assert torch.equal(base.weight.detach(), expect)  # FP32 sum, one rounding per absorb
    exact = w0 + factored.materialize().double()
    err_fold = float((base.weight.detach().double() - exact).norm() / (exact - w0).norm())
    err_factored = float((w0.to(dtype).double() + factored.materialize().double() - exact).norm()
                         / (exact - w0).norm())
    assert err_factored < 1e-6
    if dtype == torch.float32:
        assert err_fold < 1e-5
    else:  # BF16 rounding of W~ is ~2^-9 of |W0|, here a few percent of the anchor itself
        assert 1e-3 < err_fold < 0.5
    layer = AdaptedLinear(base, LoRADelta(OUT, IN, 2, scale=1.0), anchor)
    x = torch.randn(2, IN, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, base.weight, base.bias))


def test_fold_refuses_a_quantised_base() -> None:
    base = nn.Linear(IN, OUT)
    base.weight.quant_state = object()  # what bitsandbytes' Params4bit carries
    with pytest.raises(ConfigError, match="anchor_mode fold"):
        LowRankAnchor(OUT, IN, mode="fold").fold_into(base)


def test_fold_state_reloads_into_the_base_or_unfolds_to_a_dense_anchor() -> None:
    torch.manual_seed(0)
    trained = AdaptedLinear(nn.Linear(IN, OUT), LoRADelta(OUT, IN, 2, scale=1.0),
                            LowRankAnchor(OUT, IN, mode="fold"))
    trained.anchor.fold_into(trained.base)
    w0 = trained.base.weight.detach().clone()
    up, down = _pieces(1)[0]
    trained.anchor.absorb(up, down)
    _, anchors, _, _ = collect_tensors({"l": trained}, None)
    assert set(anchors) == {"l.folded"}
    for unfold in (False, True):
        fresh = AdaptedLinear(nn.Linear(IN, OUT), LoRADelta(OUT, IN, 2, scale=1.0),
                              LowRankAnchor(OUT, IN, mode="fold"))
        fresh.anchor.fold_into(fresh.base)
        with torch.no_grad():
            fresh.base.weight.copy_(w0)
        fresh.anchor.load_state_tensors({"folded": anchors["l.folded"]}, unfold=unfold)
        if unfold:  # exports: W0 stays in the base, W~ - W0 is a dense FP32 anchor
            assert fresh.anchor.mode == "dense" and torch.equal(fresh.base.weight, w0)
            torch.testing.assert_close(fresh.anchor.materialize(), up @ down, rtol=1e-5, atol=1e-5)
        else:  # resume: the folded base again
            assert torch.equal(fresh.base.weight, trained.base.weight)
        torch.testing.assert_close(effective_weight(fresh, torch.zeros(OUT, IN)),
                                   effective_weight(trained, torch.zeros(OUT, IN)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("anchor_keep_energy", "0", "anchor_keep_energy must be in"),
        ("anchor_max_rank", "0", "anchor_max_rank must be >= 1"),
        ("anchor_dtype", "fp16", "anchor_dtype must be fp32 or bf16"),
        ("anchor_mode", "folded", "lowrank, dense or fold"),
    ],
)
def test_bad_anchor_keys_are_one_line_config_errors(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"method.{key}": value})
    with pytest.raises(ConfigError, match="truncates a lowrank anchor only"):
        load_config(None, {"method.anchor_mode": "fold", "method.anchor_keep_energy": "0.9"})


# ------------------------------------------------------------------------------ short real runs

QUICK = {
    "method.name": "peso-r",
    "method.restart_every": 3,
    "train.max_steps": 8,
    "train.batch_size": 4,
    "train.quiet": True,
    "train.eval_every": 0,
    "train.export": "none",
    "data.val_split": 0.0,
    "data.limit": 32,
    "train.device": "cpu",
}

OPTIONS = {
    "keep-energy": {"method.anchor_keep_energy": 0.9},
    "max-rank": {"method.anchor_max_rank": 4},
    "bf16": {"method.anchor_dtype": "bf16", "method.anchor_max_rank": "null"},  # exact, only stored in bf16
    "fold": {"method.anchor_mode": "fold"},
}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_anchor_option_trains_records_and_exports_to_the_trained_logits(tmp_path: Path, option: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(embedded_config_path(), {**QUICK, **OPTIONS[option], "train.output_dir": str(tmp_path),
                                               "train.run_name": option})
    run_dir = run_training(cfg).run_dir
    events = summarize(read_run_log(run_dir))
    assert [e.kind for e in events] == ["init", "restart", "restart"]
    lossy = option in ("keep-energy", "max-rank")
    assert all((e.anchor_dropped_max is not None) == lossy for e in events)
    if lossy:
        assert max(e.anchor_dropped_max for e in events if e.kind == "restart") > 0
    shown = CliRunner().invoke(main, ["restart-inspect", str(run_dir)], terminal_width=160)
    assert shown.exit_code == 0, shown.output
    assert ("dropped" in shown.output) == lossy  # the column only for a lossy anchor
    run = load_run(run_dir)
    if option == "max-rank":
        assert max(layer.anchor.rank for layer in run.engine.layers.values()) == 4
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = _logits(run.model, ids)
    for fmt in ("anchored", "adapter", "merged"):
        out = export_run(run, fmt, tmp_path / fmt, ExportOptions(verify=False, max_rank=1024)).out
        folder = {"anchored": out / "model", "adapter": out / "base", "merged": out}[fmt]
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").eval()
        adapter = {"anchored": out / "adapter", "adapter": out}.get(fmt)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        assert _rel(_logits(model, ids), reference) < 1e-4, fmt
        assert check_path(out) == []


def test_fold_run_resumes_into_the_folded_base(tmp_path: Path) -> None:
    """The saved folded base is what training left; loading it for training writes it back."""
    cfg = load_config(embedded_config_path(), {**QUICK, **OPTIONS["fold"], "train.max_steps": 4,
                                               "train.output_dir": str(tmp_path), "train.run_name": "f"})
    run_dir = run_training(cfg).run_dir
    run = load_run(run_dir)  # unfolded: W0 + dense anchor
    layers = run.engine.layers
    name, layer = next(iter(layers.items()))
    assert layer.anchor.mode == "dense" and not layer.anchor.is_zero
    folded_expected = (layer.base.weight.float() + layer.anchor.weight).clone()
    fresh = load_run(run_dir)
    for each in fresh.engine.layers.values():  # as the trainer builds them: fold anchors
        each.anchor.mode, each.anchor.weight = "fold", torch.zeros(0, 0)
        each.anchor.fold_into(each.base)
    load_layer_tensors(run.state_dir, fresh.engine.layers)
    torch.testing.assert_close(fresh.engine.layers[name].base.weight, folded_expected, rtol=1e-6, atol=1e-6)


def test_bf16_anchor_is_saved_for_backward_as_is_not_widened() -> None:
    """The fused chain keeps the BF16 pair, not FP32 copies (those would cost more than an FP32 anchor)."""
    anchor = LowRankAnchor(OUT, IN, dtype=torch.bfloat16)
    anchor.absorb(torch.randn(OUT, 40), torch.randn(40, IN))
    layer = AdaptedLinear(nn.Linear(IN, OUT).requires_grad_(False), LoRADelta(OUT, IN, 2, scale=1.0), anchor)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(3, IN, requires_grad=True)).sum()
    anchor_shaped = [t for t in saved if t.shape in ((OUT, 40), (40, IN))]
    assert len(anchor_shaped) == 2 and all(t.dtype == torch.bfloat16 for t in anchor_shaped)


def test_peso_r_caps_its_anchor_by_default_and_other_modes_ignore_the_cap() -> None:
    """peso-r's default anchor is capped at rank 16 ([perf]); the baselines keep theirs exact; fold and
    dense anchors (exact by construction) still validate under peso-r's default cap."""
    assert load_config(None, {"method.name": "peso-r"}).method.anchor_max_rank == 16
    for name in ("relora", "rac-lora", "lora"):
        assert load_config(None, {"method.name": name}).method.anchor_max_rank is None
    for mode in ("fold", "dense"):
        method = load_config(None, {"method.name": "peso-r", "method.anchor_mode": mode}).method
        assert method.anchor_mode == mode
    exact = load_config(None, {"method.name": "peso-r", "method.anchor_max_rank": "null"}).method
    assert exact.anchor_max_rank is None
