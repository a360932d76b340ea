"""``load_run``: the trained model comes back exactly, from ``final/`` or a checkpoint; clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pesocli.config import embedded_config_path, load_config
from pesocli.errors import PesoError
from pesocli.runs import checkpoints, load_run
from pesocli.train import run_training


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(embedded_config_path(), {
        "train.max_steps": 6, "train.batch_size": 4, "train.quiet": True, "train.eval_every": 0,
        "data.limit": 80, "data.val_split": 0.1, "train.device": "cpu", "train.output_dir": str(root),
        "train.run_name": "r", "method.name": "peso-r", "method.restart_every": 3,
        "checkpoint.every": 3, "checkpoint.keep_last": 0,
    })
    return run_training(cfg).run_dir


def test_final_state_reproduces_the_trained_eval_loss(run_dir: Path) -> None:
    from pesocli.data import build_datasets
    from pesocli.train.loop import evaluate

    run = load_run(run_dir)
    assert run.step == 6 and run.state_dir == (run_dir / "final").resolve() and run.checkpoint is None
    assert run.method_name == "peso-r" and not run.model.training
    assert any(layer.anchor.rank > 0 for layer in run.engine.layers.values())
    bundle = build_datasets(run.cfg.data, run.tokenizer, seed=run.cfg.train.seed)
    loss = evaluate(run.model, bundle, run.cfg.train.batch_size, run.model.device)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert loss == pytest.approx(summary["eval_loss"], rel=1e-5)


def test_checkpoint_is_loaded_by_step(run_dir: Path) -> None:
    assert list(checkpoints(run_dir)) == [3]
    run = load_run(run_dir, checkpoint=3)
    assert run.step == 3 and run.state_dir.name == "step-000003" and run.checkpoint == 3


def test_errors_name_what_exists(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PesoError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PesoError, match="is empty"):
        load_run(tmp_path / "empty")
    with pytest.raises(PesoError, match=r"no checkpoint at step 5; checkpoints: 3"):
        load_run(run_dir, checkpoint=5)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    shutil.rmtree(unfinished / "final")
    with pytest.raises(PesoError, match=r"no final/ state .*checkpoints: 3 \(pass --checkpoint STEP\)"):
        load_run(unfinished)


def test_quant_override_loads_the_same_state_on_other_base_weights(run_dir: Path) -> None:
    run = load_run(run_dir, quant="none")
    assert run.cfg.model.quant == "none" and run.step == 6
