"""Bad input and bad numbers: one line on stderr, the right exit code, no traceback, nothing half-written.

Every bad input of the [reliability] issue runs through ``peso train`` in-process; non-finite
losses, gradients, loss spikes and failing restarts are injected by wrapping the loss and the
method, and a full disk by making the safetensors writer fail.
"""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

import pesocli.train.loop as loop
from pesocli.cli import main
from pesocli.engine import Engine
from pesocli.layers import AdaptedLinear
from pesocli.train.state import verify_state

BASE = [
    "--max-steps", "3", "--batch-size", "4", "--quiet", "--set", "data.limit=32",
    "--set", "data.val_split=0",
]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PESO_DEBUG", raising=False)


def _train(tmp_path: Path, *args: str):
    return CliRunner().invoke(
        main, ["train", *BASE, "--output-dir", str(tmp_path / "runs"), "--run-name", "r", *args]
    )


def _fails(tmp_path: Path, *args: str, code: int = 2) -> str:
    """Run, expect ``code``, one ``error:`` line and no run folder; return that line."""
    result = _train(tmp_path, *args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a half-written run folder was left"
    return lines[0]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------ bad input


def test_missing_model_folder(tmp_path: Path) -> None:
    assert "does not exist" in _fails(tmp_path, "--model", str(tmp_path / "no" / "model"))


def test_unknown_model_or_alias_lists_the_aliases(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--model", "llama-9b")
    assert "unknown model 'llama-9b'" in line and "llama-3.1-8b" in line


def test_model_not_in_the_cache(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--model", "peso-test/no-such-model")
    assert "not in the Hugging Face cache" in line and "never downloads" in line


def test_unknown_method_lists_the_methods(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--method", "peso-x")
    assert "unknown method 'peso-x'" in line and "lora" in line and "peso-t" in line


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.yaml", "model:\n  name: [tiny\ntrain: {}\n")
    line = _fails(tmp_path, "--config", config)
    assert f"{config}:" in line and "invalid YAML" in line


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    assert "optim.lrr: unknown key (did you mean optim.lr?)" in _fails(tmp_path, "--set", "optim.lrr=1")
    config = _write(tmp_path / "typo.yaml", "train:\n  batch_sise: 4\n")
    line = _fails(tmp_path, "--config", config)
    assert "did you mean train.batch_size?" in line and config in line


def test_malformed_data_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "1+1", "output": "2"})
    data = _write(tmp_path / "data.jsonl", f"{good}\n{{\"instruction\": \n{good}\n")
    assert f"{data}:2: invalid JSON" in _fails(tmp_path, "--data", data)
    data = _write(tmp_path / "keys.jsonl", f"{good}\n{json.dumps({'instruction': 'x'})}\n")
    assert f"{data}:2: missing key 'output'" in _fails(tmp_path, "--data", data)


def test_empty_dataset_after_filtering(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--max-length", "8")  # every prompt is longer: nothing trained is left
    assert "no record has a trained token left" in line
    assert "empty file" in _fails(tmp_path, "--data", _write(tmp_path / "empty.jsonl", "\n"))


def test_rank_at_or_above_min_m_n(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--rank", "48")  # k_proj of the tiny model is (48, 96)
    assert "method.rank 48 must be below min(out, in) = 48" in line and "k_proj" in line


def test_restart_period_below_one(tmp_path: Path) -> None:
    assert "method.restart_every (K) must be >= 1 (got 0)" in _fails(tmp_path, "--restart-every", "0")


def test_target_pattern_matching_nothing_lists_what_exists(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--set", "method.target_modules=qq_proj")
    assert "match no linear layer" in line and "q_proj" in line and "down_proj" in line


def test_method_that_cannot_run_on_the_quantisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pesocli.methods.lora import LoRA

    monkeypatch.setattr(LoRA, "needs_writable_base", True, raising=False)  # no shipped method writes W0
    line = _fails(tmp_path, "--method", "lora", "--set", "model.quant=nf4")
    assert "method lora writes the base weights and cannot train on a nf4 backbone" in line
    assert "model.quant must be" in _fails(tmp_path, "--set", "model.quant=nf3")


def test_bad_new_options(tmp_path: Path) -> None:
    assert "loss_spike_factor must be > 1" in _fails(tmp_path, "--loss-spike-factor", "0.5")
    result = _train(tmp_path, "--nan-policy", "ignore")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "exclude each other" in _fails(tmp_path, "--resume", "auto", "--overwrite")
    assert "does not exist" in _fails(tmp_path, "--resume", str(tmp_path / "nope"))


def test_existing_output_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("mine")
    result = _train(tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"error: run folder {run} exists; pass --overwrite, --resume {run} or choose --run-name"
    )
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def _full_disk(monkeypatch: pytest.MonkeyPatch, on_call: int, error: Exception) -> None:
    import pesocli.train.state as state

    calls = {"n": 0}
    real = state.save_file

    def save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= on_call:
            raise error
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state, "save_file", save_file)


@pytest.mark.parametrize(
    "error",
    [SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     OSError(errno.ENOSPC, "No space left on device")],
)  # fmt: skip
def test_disk_full_before_the_first_checkpoint_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    _full_disk(monkeypatch, 1, error)
    line = _fails(tmp_path, code=1)
    assert line == f"error: disk full while writing {tmp_path / 'runs/r/final'}"


def test_disk_full_later_keeps_the_good_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _full_disk(monkeypatch, 5, OSError(errno.ENOSPC, "No space left on device"))  # 4 files per checkpoint
    result = _train(tmp_path, "--max-steps", "6", "--checkpoint-every", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    checkpoints = tmp_path / "runs/r/checkpoints"
    assert result.stderr.strip() == f"error: disk full while writing {checkpoints / 'step-000004'}"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002"]  # no temporary folder
    assert verify_state(checkpoints / "step-000002") is None


# ------------------------------------------------------------------------------- bad numbers


class Poison:
    """Replace the loss of the given training steps (1-based, in this session) by ``how(model, loss)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, steps: set[int], how) -> None:
        self.step, self.inside = 0, False
        real_step, real_loss = Engine.training_step, loop.lm_loss

        @contextlib.contextmanager
        def training_step(engine, *args, **kwargs):
            self.step += 1
            self.inside = True
            try:
                with real_step(engine, *args, **kwargs):
                    yield
            finally:
                self.inside = False

        def lm_loss(model, batch):
            loss = real_loss(model, batch)
            return how(model, loss) if self.inside and self.step in steps else loss

        monkeypatch.setattr(Engine, "training_step", training_step)
        monkeypatch.setattr(loop, "lm_loss", lm_loss)


def nan_loss(model, loss):
    return loss * float("nan")


def nan_gradient(model, loss):
    """A finite loss whose gradient for the first adapter is NaN (sqrt at 0 times 0)."""
    param = next(m for m in model.modules() if isinstance(m, AdaptedLinear)).delta.lora_A
    return loss + torch.sqrt(((param - param.detach()) ** 2).sum())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_stop_writes_the_last_good_state_and_names_step_and_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Poison(monkeypatch, {6}, nan_loss)
    result = _train(tmp_path, "--method", "lora", "--max-steps", "10")
    assert result.exit_code == 1 and "Traceback" not in result.output
    run = tmp_path / "runs/r"
    assert result.stderr.strip() == (
        "error: step 6: non-finite loss (nan); non-finite gradients in 14 of 14 layers, first "
        f"model.layers.0.self_attn.q_proj; wrote the last good state to {run / 'checkpoints/step-000005'}; "
        f"resume with --resume {run} (--nan-policy skip drops such steps)"
    )
    assert verify_state(run / "checkpoints/step-000005") is None
    assert max(m["step"] for m in _metrics(run)) == 5

    monkeypatch.undo()
    Poison(monkeypatch, {1}, nan_loss)  # the same step fails again; skip it this time
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--nan-policy", "skip"])
    assert result.exit_code == 0, result.output
    assert "warning: step 6: non-finite loss (nan)" in result.stderr
    assert "update skipped" in result.stderr
    assert [m["step"] for m in _metrics(run) if "skipped" in m] == [6]
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(run / "final/adapters.safetensors").values())


def test_non_finite_gradient_with_a_finite_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Poison(monkeypatch, {2}, nan_gradient)
    result = _train(tmp_path, "--method", "lora", "--max-steps", "4")
    assert result.exit_code == 1
    first = "model.layers.0.self_attn.q_proj"
    assert f"step 2: non-finite gradients in 1 of 14 layers, first {first}" in result.stderr


def test_loss_spike_is_skipped_or_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Poison(monkeypatch, {9}, lambda model, loss: loss * 100)
    args = ["--method", "lora", "--max-steps", "10", "--loss-spike-factor", "3", "--nan-policy", "skip"]
    result = _train(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert "warning: step 9: loss spike:" in result.stderr and "x" in result.stderr
    skipped = [m for m in _metrics(tmp_path / "runs/r") if "skipped" in m]
    assert [m["step"] for m in skipped] == [9] and skipped[0]["loss"] > 100

    monkeypatch.undo()
    Poison(monkeypatch, {9}, lambda model, loss: loss * 100)
    result = CliRunner().invoke(
        main, ["train", *BASE, "--output-dir", str(tmp_path / "stop"), "--run-name", "s", *args[:-2]]
    )
    assert result.exit_code == 1 and "step 9: loss spike" in result.stderr
    assert verify_state(tmp_path / "stop/s/checkpoints/step-000008") is None


def test_too_many_bad_steps_in_a_row_stop_even_when_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Poison(monkeypatch, set(range(4, 20)), nan_loss)
    result = _train(tmp_path, "--method", "lora", "--max-steps", "10", "--nan-policy", "skip",
                    "--set", "train.max_consecutive_skips=3")  # fmt: skip
    assert result.exit_code == 1
    assert "step 6: non-finite loss (nan)" in result.stderr and "(3 bad steps in a row)" in result.stderr
    assert verify_state(tmp_path / "runs/r/checkpoints/step-000005") is None


def test_a_restart_with_non_finite_factors_keeps_the_old_subspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pesocli.methods.peso_r import PesoR

    real = PesoR.restart
    victim = "model.layers.1.mlp.down_proj"

    def restart(self, ctx):
        records = real(self, ctx)
        if ctx.step == 4:
            ctx.layers[victim].delta.lora_B.data[0, 0] = float("inf")
        return records

    monkeypatch.setattr(PesoR, "restart", restart)
    result = _train(tmp_path, "--max-steps", "10", "--restart-every", "4")
    assert result.exit_code == 0, result.output
    assert f"restart before step 5: non-finite factors in 1 of 14 layers (first {victim})" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/r/restarts.jsonl").read_text().splitlines()]
    at_4 = {r["layer"]: r for r in records if r["step"] == 5}  # 1-based: before step 5
    assert at_4[victim]["kind"] == "kept-old-subspace" and at_4[victim]["anchor_rank"] == 0
    assert sum(r["kind"] == "restart" for r in at_4.values()) == 13
    final = load_file(tmp_path / "runs/r/final/adapters.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_a_restart_that_raises_on_non_finite_gradients_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pesocli.engine as engine_module

    real = engine_module.estimate_full_gradients
    calls = {"n": 0}

    def estimate(layers, run_pass, rank, config):
        calls["n"] += 1
        estimates = real(layers, run_pass, rank, config)
        if calls["n"] == 2:
            first = next(iter(estimates))
            estimates[first].coefficients[0, 0] = float("nan")
        return estimates

    monkeypatch.setattr(engine_module, "estimate_full_gradients", estimate)
    result = _train(tmp_path, "--max-steps", "10", "--restart-every", "4")
    assert result.exit_code == 0, result.output
    assert "restart before step 5: the restart failed" in result.stderr and "14 of 14 layers" in result.stderr
    summary = json.loads((tmp_path / "runs/r/summary.json").read_text())
    assert summary["restarts"] == 2  # steps 0 and 8; the one at 4 was undone
    state = json.loads((tmp_path / "runs/r/final/state.json").read_text())
    assert state["method_state"]["restarts_done"] == 2


def test_stop_at_a_restart_step_goes_back_before_the_restart_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--max-steps", "10", "--restart-every", "4", "--set", "train.log_every=1"]
    reference = CliRunner().invoke(
        main, ["train", *BASE, *args, "--output-dir", str(tmp_path / "ref"), "--run-name", "r"]
    )
    assert reference.exit_code == 0, reference.output
    Poison(monkeypatch, {5}, nan_loss)  # step 5 (index 4) starts with the second restart
    result = _train(tmp_path, *args)
    assert result.exit_code == 1
    run = tmp_path / "runs/r"
    state = json.loads((run / "checkpoints/step-000004/state.json").read_text())
    assert state["method_state"] == {"restarts_done": 1, "rescale_pending": False}
    assert all(layer["anchor_rank"] == 0 for layer in state["layers"].values())  # the restart is undone

    monkeypatch.undo()
    result = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    ours = [m["loss"] for m in _metrics(run) if "loss" in m]
    theirs = [m["loss"] for m in _metrics(tmp_path / "ref/r") if "loss" in m]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    mine, ref = (load_file(p / "final/anchors.safetensors") for p in (run, tmp_path / "ref/r"))
    assert all(torch.allclose(mine[k], ref[k], rtol=1e-6, atol=0) for k in ref)


def test_interrupt_before_the_first_checkpoint_still_writes_one(tmp_path: Path) -> None:
    """SIGINT after step 2 of a run without periodic checkpoints: a checkpoint, exit 130, folder kept."""
    import signal

    from pesocli.config import embedded_config_path, load_config
    from pesocli.errors import Interrupted
    from pesocli.train import run_training
    from pesocli.train.progress import Reporter

    class Ctrl_C(Reporter):
        def step(self, step: int, metrics: dict) -> None:
            if step == 1:
                signal.raise_signal(signal.SIGINT)

    cfg = load_config(embedded_config_path(), {
        "train.max_steps": 5, "train.batch_size": 4, "data.limit": 32, "data.val_split": 0,
        "train.quiet": True, "train.output_dir": str(tmp_path / "runs"), "train.run_name": "r",
        "method.name": "lora",
    })  # fmt: skip
    with pytest.raises(Interrupted) as stopped:
        run_training(cfg, reporter=Ctrl_C(5, quiet=True))
    assert stopped.value.exit_code == 130
    assert verify_state(tmp_path / "runs/r/checkpoints/step-000002") is None


def test_a_skipped_restart_step_leaves_the_rescale_pending_and_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peso-r's D.2 rescale waits for the first good step after a restart; a checkpoint in between
    holds ``rescale_pending`` and the resumed run applies it exactly where the original did."""
    import shutil

    Poison(monkeypatch, {5}, nan_loss)  # step 5 starts with the restart at index 4, then is skipped
    args = ["--max-steps", "10", "--restart-every", "4", "--checkpoint-every", "5", "--nan-policy", "skip",
            "--set", "train.log_every=1", "--set", "method.rescale_moments=true"]  # fmt: skip
    result = _train(tmp_path, *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/r"
    state = json.loads((run / "checkpoints/step-000005/state.json").read_text())
    assert state["method_state"] == {"restarts_done": 2, "rescale_pending": True}

    monkeypatch.undo()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    result = CliRunner().invoke(main, ["train", "--resume", str(copy)])
    assert result.exit_code == 0, result.output
    ours, theirs = (load_file(p / "final/optimizer.safetensors") for p in (copy, run))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [m.get("loss") for m in _metrics(copy)] == [m.get("loss") for m in _metrics(run)]


def test_missing_runs_exit_2_in_every_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One convention: a run folder that is not there is a usage error (exit 2), in every command; ``peso
    eval runs/nope`` says so instead of looking for a Hugging Face model ``runs/nope``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for args in (["eval", "runs/nope"], ["export", "runs/nope", "--out", "x"],
                 ["merge", "runs/nope", "--out", "x"], ["restart-inspect", "runs/nope"],
                 ["train", "--resume", "runs/nope"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        line = result.output.strip()
        assert "\n" not in line and "runs/nope does not exist" in line, (args, line)
        assert "Hugging Face" not in line and "Traceback" not in line


def test_an_unknown_alias_gets_a_did_you_mean(tmp_path: Path) -> None:
    line = _fails(tmp_path, "--model", "llama3.1-8b")
    assert "unknown model 'llama3.1-8b' (did you mean llama-3.1-8b?" in line


def test_ctrl_c_is_reported_as_an_interruption_not_an_error(capsys: pytest.CaptureFixture) -> None:
    from pesocli.cli.common import report_failure
    from pesocli.errors import Interrupted

    code = report_failure(Interrupted("SIGINT after step 2 of 5: wrote a full checkpoint to X", 2))
    assert code == 130
    assert capsys.readouterr().err == "interrupted: SIGINT after step 2 of 5: wrote a full checkpoint to X\n"


def test_the_signal_note_starts_its_own_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the note must not be glued after the progress bar's text: it starts with a newline."""
    import os
    import signal
    import sys

    from pesocli.train.guards import StopSignals

    read, write = os.pipe()

    class Terminal:
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return write

    monkeypatch.setattr(sys, "stderr", Terminal())
    stops = StopSignals()
    stops._handle(signal.SIGINT, None)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read().startswith("\nreceived SIGINT: finishing this step")
    assert stops.signum == signal.SIGINT
