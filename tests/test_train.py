"""End-to-end ``peso train``: the run folder, the loss going down, other model families and data formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pesocli.cli import main
from pesocli.config import embedded_config_path, load_config
from pesocli.train import run_training

SHORT = {
    "train.max_steps": 40,
    "train.batch_size": 16,
    "optim.lr": 1e-2,
    "train.quiet": True,
    "train.eval_every": 20,
    "train.log_every": 1,
}


def _cfg(tmp_path: Path, **overrides):
    return load_config(
        embedded_config_path(),
        {**SHORT, "train.output_dir": str(tmp_path), "train.run_name": "run", **overrides},
    )


@pytest.mark.parametrize("method", ["lora", "peso-r"])
def test_short_run_writes_the_run_folder_and_learns(tmp_path: Path, method: str) -> None:
    cfg = _cfg(
        tmp_path, **{"method.name": method, **({"method.restart_every": 15} if method == "peso-r" else {})}
    )
    result = run_training(cfg)
    run = tmp_path / "run"
    assert result.run_dir == run
    assert result.final_loss < 0.8 * result.initial_loss
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").method_name == method  # the saved config is complete
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 41))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "next_restart_in"} <= set(steps[0])
    assert any("eval_loss" in m for m in metrics)
    restarts = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    final = run / "final"
    state = json.loads((final / "state.json").read_text())
    manifest = json.loads((final / "manifest.json").read_text())
    assert set(manifest) == {
        "adapters.safetensors",
        "anchors.safetensors",
        "optimizer.safetensors",
        "state.json",
    }
    adapters = load_file(final / "adapters.safetensors")
    anchors = load_file(final / "anchors.safetensors")
    assert len(adapters) == 2 * 14 and len(anchors) == 2 * 14  # 2 layers x 7 projections
    assert state["step"] == 40 and state["method"] == method
    if method == "lora":
        assert restarts == []
        assert all(t.numel() == 0 for t in anchors.values())
    else:
        assert sorted({r["step"] for r in restarts}) == [1, 16, 31]  # 1-based: before steps 1, 16, 31
        assert len(restarts) == 3 * 14
        later = [r for r in restarts if r["step"] > 1]
        assert all(
            0 < r["captured_energy"] <= 1 + 1e-6 and r["principal_angle_deg"] is not None for r in later
        )
        assert all(r["anchor_rank"] > 0 for r in later)
        assert state["method_state"]["restarts_done"] == 3
        assert any(t.numel() > 0 for t in anchors.values())
    # training ends with the anchored export, checked against the trained model before it lands
    assert (run / "export/anchored/model/config.json").is_file()
    assert (run / "export/anchored/adapter/adapter_config.json").is_file()
    assert (run / "export/anchored/peso_export.json").is_file()
    assert json.loads((run / "summary.json").read_text())["restarts"] == (0 if method == "lora" else 3)


def test_saved_state_reproduces_the_trained_model(tmp_path: Path) -> None:
    """final/ holds what the model computes: reload adapters + anchors into a fresh model, same logits."""
    from pesocli.engine import Engine
    from pesocli.methods import build_method
    from pesocli.models import load_model_and_tokenizer
    from pesocli.train.state import load_layer_tensors

    cfg = _cfg(tmp_path, **{"method.name": "peso-r", "method.restart_every": 10, "train.max_steps": 25})
    run_training(cfg)
    model, _ = load_model_and_tokenizer(cfg.model, "cpu")
    engine = Engine(model, build_method(cfg.method, cfg.method_name), cfg.fullgrad)
    load_layer_tensors(tmp_path / "run/final", engine.layers)
    reference, _ = load_model_and_tokenizer(cfg.model, "cpu")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-3)  # it did train
    # anchor + adapters folded into dense weights reproduce the adapted model
    with torch.no_grad():
        for name, layer in engine.layers.items():
            target = reference.get_submodule(name)
            target.weight += layer.anchor.materialize() + layer.delta.weight()
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def _save_tiny_family(path: Path, family: str) -> None:
    from pesocli.models import load_tiny_tokenizer, tiny_model_config

    tokenizer = load_tiny_tokenizer()
    config = tiny_model_config(
        family,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _write_formats(folder: Path) -> dict[str, Path]:
    from pesocli.paths import default_train_data

    records = [json.loads(line) for line in default_train_data().read_text().splitlines()[:400]]
    files = {
        "alpaca": folder / "alpaca.jsonl",
        "text": folder / "text.jsonl",
        "messages": folder / "chat.json",
    }
    files["alpaca"].write_text("".join(json.dumps(r) + "\n" for r in records))
    files["text"].write_text(
        "".join(json.dumps({"text": f"{r['instruction']}\n{r['output']}"}) + "\n" for r in records)
    )
    files["messages"].write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
                for r in records
            ]
        )
    )
    return files


@pytest.mark.parametrize(("family", "fmt"), [("qwen2", "messages"), ("mistral", "text"), ("qwen2", "alpaca")])
def test_local_model_folder_and_each_data_format(tmp_path: Path, family: str, fmt: str) -> None:
    model_dir = tmp_path / "model"
    _save_tiny_family(model_dir, family)
    data = _write_formats(tmp_path)[fmt]
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--method",
            "peso-r",
            "--restart-every",
            "20",
            "--max-steps",
            "50",
            "--lr",
            "1e-2",
            "--quiet",
            "--output-dir",
            str(tmp_path / "runs"),
            "--run-name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs/r/summary.json").read_text())
    assert summary["final_loss"] < 0.75 * summary["initial_loss"]
    assert summary["restarts"] == 3


def test_cli_dry_run_prints_stats_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--dry-run", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "records" in result.output and "### Response:" in result.output and "method:" in result.output
    assert not any(tmp_path.iterdir())


def test_existing_run_folder_is_refused(tmp_path: Path) -> None:
    args = [
        "train",
        "--method",
        "lora",
        "--max-steps",
        "2",
        "--quiet",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "same",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2
    assert "exists" in again.output and "Traceback" not in again.output


def test_export_none_writes_no_export(tmp_path: Path) -> None:
    args = [
        "train",
        "--method",
        "lora",
        "--max-steps",
        "3",
        "--quiet",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "r",
        "--export",
        "none",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r/final").is_dir() and not (tmp_path / "r/export").exists()


def test_lm_loss_projects_only_from_the_first_trained_position() -> None:
    """``lm_loss`` skips the vocabulary projection of prompt-only columns; the sum and the gradient of
    the full-logits cross-entropy are unchanged (right-padded rows whose answers start at different
    columns, plus a batch with nothing trained)."""
    from pesocli.models import build_tiny_model, load_tiny_tokenizer
    from pesocli.train.loop import lm_loss

    torch.manual_seed(0)
    model = build_tiny_model(load_tiny_tokenizer())
    ids = torch.randint(3, 400, (3, 12))
    labels = ids.clone()
    labels[0, :7], labels[1, :5], labels[2, :9] = -100, -100, -100
    labels[1, 10:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    calls = []
    model.register_forward_hook(lambda _m, _a, _kw, out: calls.append(out.logits.shape[1]), with_kwargs=True)

    def reference() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        shifted, trained = labels[:, 1:], labels[:, 1:] != -100
        kept = logits[:, :-1][trained].float()
        return torch.nn.functional.cross_entropy(kept, shifted[trained], reduction="sum")

    expected = reference()
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = lm_loss(model, batch)
    loss.backward()
    assert calls[-1] == 12 - 4  # the first trained label is column 5 of the inputs: logits from column 4
    assert torch.allclose(loss, expected, rtol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)
    nothing = {**batch, "labels": torch.full_like(labels, -100)}
    assert float(lm_loss(model, nothing).detach()) == 0.0


def test_a_plan_of_many_epochs_is_announced_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus {i} is {2 * i}"}) + "\n" for i in range(2)))
    args = ["train", "--data", str(data), "--max-steps", "5", "--batch-size", "2", "--method", "lora",
            "--export", "none", "--output-dir", str(tmp_path), "--run-name", "r", "--set", "data.val_split=0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "plan: 5 steps x 2 sequences = 5.00 epochs over 2 examples" in result.output
    assert "warning: the plan is 5.0 passes over 2 training examples" in result.stderr


def test_restart_steps_are_1_based_everywhere_and_flagged_in_metrics(tmp_path: Path) -> None:
    """Restarts before the 1st, 6th and 11th step (every 5): ``restarts.jsonl`` says steps 1, 6, 11 (version
    2), and ``metrics.jsonl`` logs those steps (although only every 5th is logged) with ``restart: true``."""
    result = run_training(_cfg(tmp_path, **{"train.max_steps": 12, "method.restart_every": 5,
                                            "train.log_every": 5, "train.eval_every": 0,
                                            "train.export": "none"}))
    run = result.run_dir
    restarts = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in restarts}) == [1, 6, 11] and {r["version"] for r in restarts} == {2}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["restart"] for m in metrics if "loss" in m}
    assert logged == {1: True, 5: False, 6: True, 10: False, 11: True, 12: False}


def test_progress_at_80_columns_keeps_step_total_and_eta_and_announces_restarts_and_evals(
    tmp_path: Path,
) -> None:
    from rich.console import Console

    from pesocli.train.progress import Reporter

    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    reporter = Reporter(12, console=console)
    cfg = _cfg(tmp_path, **{"train.max_steps": 12, "method.restart_every": 5, "train.eval_every": 6,
                            "train.quiet": False, "train.export": "none"})
    run_training(cfg, reporter=reporter)
    text = console.export_text()
    assert re.findall(r"restart before step (\d+): 14 layers", text) == ["1", "6", "11"]
    assert "captured energy (median)" in text and "loss before" in text
    assert re.findall(r"step (\d+): eval loss", text) == ["6", "12"]
    last = _bar_line(reporter, 80)
    assert len(last) <= 80 and "…" not in last
    assert re.search(r"12/12 \d:\d\d:\d\d \d:\d\d:\d\d loss \d", last), last


def _bar_line(reporter, width: int) -> str:
    """The progress bar's current line as a terminal of ``width`` columns shows it."""
    import io

    from rich.console import Console

    snap = Console(width=width, record=True, color_system=None, file=io.StringIO())
    snap.print(reporter._progress.get_renderable())
    return snap.export_text().rstrip("\n")


@pytest.mark.parametrize("width", [60, 80, 200])
def test_the_bar_drops_secondary_fields_first(width: int) -> None:
    from rich.console import Console

    from pesocli.train.progress import Reporter

    console = Console(width=width, force_terminal=True, color_system=None, file=__import__("io").StringIO())
    metrics = {"loss": 1.2345, "lr": 2e-4, "tokens_per_s": 12345.0, "peak_memory_bytes": 400 * 2**20,
               "next_restart_in": 88}
    with Reporter(300, console=console) as reporter:
        reporter.step(11, metrics)
        line = _bar_line(reporter, width)
    assert len(line) <= width and "…" not in line and re.search(r" 12/300 \d:\d\d:\d\d \S+", line), line
    if width >= 80:
        assert "loss 1.2345  restart in 88" in line
    if width >= 200:
        assert "lr 2.00e-04  12345 tok/s  mem 400 MiB" in line


def test_a_plain_lora_run_on_a_model_folder_exports_the_adapter_not_a_copy(tmp_path: Path) -> None:
    """Empty anchor: ``RUN/export/anchored`` is the adapter on the base folder (no model copy); reloaded on
    that folder with PEFT it gives the trained logits; the summary says how much was written where."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pesocli.runs import load_run

    model_dir = tmp_path / "model"
    _save_tiny_family(model_dir, "qwen2")
    args = ["train", "--model", str(model_dir), "--method", "lora", "--max-steps", "3", "--lr", "1e-2",
            "--set", "data.limit=32", "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]
    result = CliRunner(env={"COLUMNS": "400"}).invoke(main, args)  # the summary table on one line per row
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs/r/export/anchored"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter", "peso_export.json", "serve.sh"]
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    text = " ".join(result.output.split())
    assert f"written to {out} (the adapter only: the base {model_dir} is used in place" in text
    assert any(unit in text for unit in ("KiB written", "MiB written")) and written < 2**20
    assert f"vllm serve {model_dir}" in (out / "README.md").read_text()

    trained = load_run(tmp_path / "runs/r")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(plain, out / "adapter").eval()
    with torch.no_grad():
        reference = trained.model(input_ids=ids).logits
        error = (served(input_ids=ids).logits - reference).abs().max() / reference.abs().max()
    assert float(error) < 1e-4
