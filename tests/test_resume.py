"""Exact resume: kill ``peso train`` (SIGKILL / SIGTERM), resume, and get the uninterrupted run's numbers.

The reference is one uninterrupted peso-r run on the tiny model: restarts every 7 steps, a
checkpoint every 10, dropout on the adapters (so the torch RNG matters), two micro-batches per
step and 8 steps per epoch (so the data order crosses epochs). Resumed runs must match its loss at
every step and its final adapters, anchors and optimizer state to 1e-6 (relative, CPU FP32).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pesocli.cli import main
from pesocli.config import embedded_config_path, load_config
from pesocli.train import run_training
from pesocli.train.progress import Reporter
from pesocli.train.resume import config_changes, resolve_resume
from pesocli.train.state import verify_state

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
REF = {
    "train.max_steps": STEPS, "train.batch_size": 4, "train.grad_accum": 2, "method.restart_every": 7,
    "checkpoint.every": 10, "optim.lr": 1e-2, "train.quiet": True, "train.log_every": 1,
    "data.limit": 64, "data.val_split": 0, "method.dropout": 0.1,
    "method.rescale_moments": True, "method.beta2_warmup": True,  # the paper's D.2: its state must travel
}  # fmt: skip


def _cli(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


ARGS = _cli(REF)


def _train(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PESO_DEBUG="0")
    return subprocess.Popen(
        [sys.executable, "-m", "pesocli.cli", "train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _invoke(*args: str):
    return CliRunner().invoke(main, ["train", *args])


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = _losses(run), _losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step, loss in theirs.items():
        assert ours[step] == pytest.approx(loss, rel=1e-6, abs=0), f"step {step}"
    for name in ("adapters", "anchors", "optimizer"):
        mine = load_file(run / "final" / f"{name}.safetensors")
        ref = load_file(reference / "final" / f"{name}.safetensors")
        assert mine.keys() == ref.keys()
        for key in ref:
            assert mine[key].shape == ref[key].shape, key  # anchor ranks too
            if ref[key].numel():
                scale = float(ref[key].abs().max())
                assert float((mine[key] - ref[key]).abs().max()) <= 1e-6 * scale, key
    restarts = [(run / "restarts.jsonl").read_text(), (reference / "restarts.jsonl").read_text()]
    assert [[json.loads(line)["step"] for line in text.splitlines()] for text in restarts] == [
        [json.loads(line)["step"] for line in restarts[1].splitlines()]
    ] * 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = _invoke(*ARGS, "--output-dir", str(out), "--run-name", "ref")
    assert result.exit_code == 0, result.output
    return out / "ref"


def _run_until(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120.0) -> int:
    """Wait until ``run`` has logged ``step`` steps; returns how many it had logged."""
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"peso train ended early ({proc.returncode}): {proc.stderr.read()}")
        if metrics.is_file():
            logged = metrics.read_text().count('"loss"')
            if logged >= step:
                return logged
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("peso train did not reach the step in time")


def test_sigkill_between_checkpoints_after_a_restart_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "killed"
    proc = _train(*ARGS, "--output-dir", str(tmp_path), "--run-name", "killed")
    _run_until(proc, run, 25)  # after the restarts at 14 and 21, between the checkpoints at 20 and 30
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    logged = max(_losses(run))
    saved = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert saved < logged < STEPS  # steps after the checkpoint were lost and must be redone
    assert not (run / "final").exists()

    result = _invoke("--resume", str(run))
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)
    assert verify_state(run / "final") is None


def test_sigterm_in_process_loses_no_step(tmp_path: Path, reference: Path) -> None:
    """SIGTERM (sent from inside, after step 23) -> checkpoint of step 23 -> exact resume."""
    from pesocli.errors import Interrupted

    cfg = _config(tmp_path, "inproc")
    with pytest.raises(Interrupted) as stopped:
        run_training(cfg, reporter=_SignalAt(STEPS, 23))
    assert stopped.value.exit_code == 143 and "after step 23 of 40" in str(stopped.value)
    run = tmp_path / "inproc"
    assert max(_losses(run)) == 23
    assert (run / "checkpoints/latest").read_text().strip() == "step-000023"
    result = _invoke("--resume", str(run))
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)


def _config(tmp_path: Path, name: str):
    """The reference config, as ``peso train ARGS`` resolves it."""
    where = {"train.output_dir": str(tmp_path), "train.run_name": name}
    return load_config(embedded_config_path(), {**REF, **where})


@pytest.mark.slow
def test_sigterm_finishes_the_step_and_exits_143(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "termed"
    proc = _train(*ARGS, "--output-dir", str(tmp_path), "--run-name", "termed")
    _run_until(proc, run, 23)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    logged = max(_losses(run))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{logged:06d}"  # no lost step: the checkpoint holds the last logged step
    assert f"--resume {run}" in stderr
    assert verify_state(run / "checkpoints" / latest) is None
    assert (run / "checkpoints" / latest / "optimizer.safetensors").is_file()

    result = _invoke("--resume", str(run))
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)


def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as if it had died after its last checkpoint (step 30): no final/, no summary."""
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000020", "step-000030"]
    return run


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, reference: Path) -> None:
    run = _interrupted_copy(reference, tmp_path)
    newest = run / "checkpoints" / "step-000030"
    for path in newest.iterdir():  # truncated mid-write, as a full disk or a crash leaves them
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = _invoke("--resume", str(run))
    assert result.exit_code == 0, result.output
    assert f"warning: checkpoint {newest} is damaged" in result.stderr
    assert "step-000020 is damaged" not in result.stderr
    _assert_same_run(run, reference)


def test_a_missing_file_is_damage_too_and_nothing_good_is_an_error(tmp_path: Path, reference: Path) -> None:
    run = _interrupted_copy(reference, tmp_path)
    (run / "checkpoints/step-000030/optimizer.safetensors").unlink()
    (run / "checkpoints/step-000020/manifest.json").unlink()
    result = _invoke("--resume", str(run))
    assert result.exit_code == 2
    assert "step-000030 is damaged (missing optimizer.safetensors)" in result.stderr
    assert "step-000020 is damaged (missing manifest.json)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resume:")
    assert "no good checkpoint" in result.stderr and "Traceback" not in result.output


def test_a_changed_config_is_refused_with_a_one_line_diff(tmp_path: Path, reference: Path) -> None:
    run = _interrupted_copy(reference, tmp_path)
    result = _invoke("--resume", str(run), "--lr", "1e-3", "--rank", "4")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "method.rank: 8 -> 4; optim.lr: 0.01 -> 0.001" in lines[0]
    assert "Traceback" not in result.output
    # more steps change the cosine schedule: refused as well
    result = _invoke("--resume", str(run), "--max-steps", "80")
    assert result.exit_code == 2 and "train.max_steps: 40 -> 80" in result.stderr
    # safe keys may change; the resumed numbers are still the reference's
    result = _invoke("--resume", str(run), "--eval-every", "7", "--keep-last", "3", "--nan-policy", "skip")
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)
    assert load_config(run / "config.yaml").checkpoint.keep_last == 3


def test_resuming_a_finished_run_does_nothing(reference: Path) -> None:
    before = (reference / "metrics.jsonl").read_text()
    result = _invoke("--resume", str(reference))
    assert result.exit_code == 0, result.output
    assert (reference / "metrics.jsonl").read_text() == before


def test_config_changes_ignore_only_the_safe_keys() -> None:
    saved = {"train": {"quiet": False, "max_steps": 10, "run_name": "a"}, "optim": {"lr": 0.1}}
    now = {"train": {"quiet": True, "max_steps": 10, "run_name": "b"}, "optim": {"lr": 0.2}}
    assert config_changes(saved, now) == ["optim.lr: 0.1 -> 0.2"]


class _SignalAt(Reporter):
    """A quiet reporter that sends this process ``signum`` once step ``at`` is done."""

    def __init__(self, total: int, at: int, signum: int = signal.SIGTERM) -> None:
        super().__init__(total, quiet=True)
        self.at, self.signum = at, signum

    def step(self, step: int, metrics: dict) -> None:
        if step + 1 == self.at:
            os.kill(os.getpid(), self.signum)


SMALL = {
    "train.max_steps": 12, "train.batch_size": 4, "data.limit": 32, "data.val_split": 0,
    "method.name": "lora", "train.quiet": True, "checkpoint.every": 5,
}  # fmt: skip


def test_resume_auto_finds_the_run_or_starts_fresh(tmp_path: Path) -> None:
    from pesocli.errors import Interrupted

    overrides = {**SMALL, "train.output_dir": str(tmp_path)}
    cfg, folder = resolve_resume("auto", None, overrides)
    assert folder is None  # nothing yet: a fresh run
    with pytest.raises(Interrupted) as stopped:
        run_training(cfg, reporter=_SignalAt(12, 7, signal.SIGINT))
    assert stopped.value.exit_code == 130
    assert (cfg.run_dir / "checkpoints/latest").read_text().strip() == "step-000007"

    other = {**overrides, "optim.lr": 1e-3}  # a different config does not pick that run up
    assert resolve_resume("auto", None, other)[1] is None
    cfg2, folder = resolve_resume("auto", None, overrides)
    assert folder == cfg.run_dir and cfg2.train.run_name == cfg.train.run_name
    assert _invoke("--resume", "auto", *_cli(overrides)).exit_code == 0
    assert (cfg.run_dir / "final").is_dir()
    assert resolve_resume("auto", None, overrides)[1] is None  # finished runs are not resumed again

    named = {**overrides, "train.run_name": "fixed"}
    assert _invoke("--resume", "auto", *_cli(named)).exit_code == 0  # fresh
    again = _invoke("--resume", "auto", *_cli(named))  # finished: says so, exits 0
    assert again.exit_code == 0, again.output


def test_checkpoints_hold_only_safetensors_and_json_and_keep_last(reference: Path) -> None:
    checkpoints = sorted((reference / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-000020", "step-000030"]  # keep_last 2
    assert (reference / "checkpoints/latest").read_text() == "step-000030\n"
    for folder in [*checkpoints, reference / "final"]:
        names = {p.name for p in folder.iterdir()}
        assert names == {
            "adapters.safetensors", "anchors.safetensors", "optimizer.safetensors", "state.json",
            "manifest.json", *(["rng.safetensors"] if folder.parent.name == "checkpoints" else []),
        }  # fmt: skip
        state = json.loads((folder / "state.json").read_text())
        for key in ("method_state", "scheduler", "rng", "data", "counters", "watchdog", "optimizer_scalars"):
            assert key in state
        assert state["method_state"].keys() == {"restarts_done", "rescale_pending"}
        scalars = next(iter(state["optimizer_scalars"].values()))
        assert {"step", "beta2_start", "beta2_window", "beta2_min"} <= scalars.keys()
        assert verify_state(folder) is None


def test_batch_stream_matches_batches_and_resumes_mid_epoch() -> None:
    from pesocli.data import DataBundle, DataStats, Example, batches
    from pesocli.train.stream import BatchStream

    examples = [Example([1, i + 2, 3], [-100, i + 2, 3]) for i in range(10)]
    bundle = DataBundle(examples, None, DataStats("x", "text", 10, 10, 30, 20, 0, 0), pad_token_id=0)
    expected = [b for epoch in range(3) for b in batches(examples, 4, 7, epoch, pad_token_id=0)]
    stream = BatchStream(bundle, 4, 7, torch.device("cpu"))
    got = [stream.next() for _ in range(len(expected))]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, expected, strict=True))
    resumed = BatchStream(bundle, 4, 7, torch.device("cpu"))
    stream = BatchStream(bundle, 4, 7, torch.device("cpu"))
    for _ in range(4):
        stream.next()
    resumed.load_state_dict(stream.state_dict())
    assert resumed.state_dict() == {"epoch": 1, "index": 1, "batches_per_epoch": 3}
    assert torch.equal(resumed.next()["input_ids"], expected[4]["input_ids"])


def _method_config(name: str, tmp_path: Path, run_name: str):
    from pesocli.methods import METHODS

    overrides = {
        **SMALL, "method.name": name, "train.max_steps": 9, "method.dropout": 0.1, "train.log_every": 1,
        "train.output_dir": str(tmp_path), "train.run_name": run_name, "checkpoint.every": 0,
    }  # fmt: skip
    if "restart_every" in METHODS[name].Config.field_names():
        overrides["method.restart_every"] = 3
    return load_config(embedded_config_path(), overrides)


FAST_METHODS = ("galore", "lorsum", "peso-t", "rac-lora", "relora")
"""Methods whose resume test runs by default (others are covered above or differ little: ``-m slow``)."""


def _method_names() -> list:
    from pesocli.methods import METHODS

    return [name if name in FAST_METHODS else pytest.param(name, marks=pytest.mark.slow) for name in METHODS]


@pytest.mark.parametrize("name", _method_names())
def test_every_method_resumes_exactly_across_a_restart(tmp_path: Path, name: str) -> None:
    """The contract for every method in METHODS: SIGTERM after step 4 of 9 (restarts at 0, 3, 6), resume."""
    from pesocli.errors import Interrupted

    run_training(_method_config(name, tmp_path, "ref"))
    with pytest.raises(Interrupted):
        run_training(_method_config(name, tmp_path, "cut"), reporter=_SignalAt(9, 4))
    result = _invoke("--resume", str(tmp_path / "cut"))
    assert result.exit_code == 0, result.output
    ours, theirs = _losses(tmp_path / "cut"), _losses(tmp_path / "ref")
    assert sorted(ours) == list(range(1, 10))
    assert [ours[s] for s in sorted(ours)] == pytest.approx([theirs[s] for s in sorted(theirs)], rel=1e-6)
    files = {p.name for p in (tmp_path / "ref/final").iterdir()}
    assert {p.name for p in (tmp_path / "cut/final").iterdir()} == files
    for file in sorted(f for f in files if f.endswith(".safetensors") and f != "rng.safetensors"):
        mine, ref = (load_file(tmp_path / run / "final" / file) for run in ("cut", "ref"))
        assert mine.keys() == ref.keys()
        for key in ref:
            assert torch.allclose(mine[key], ref[key], rtol=1e-6, atol=1e-12), (file, key)


def test_checkpoints_are_on_by_default_by_steps_and_by_wall_time() -> None:
    from pesocli.config import CheckpointConfig

    assert (CheckpointConfig().every, CheckpointConfig().every_minutes) == (500, 30.0)
    cfg = load_config(None, {"model.name": "some/model"})
    assert cfg.checkpoint.every == 500 and cfg.checkpoint.every_minutes == 30.0


@pytest.mark.slow  # ~15 s (a subprocess, 40 steps, a resume); the step-checkpoint one above is default
def test_sigkill_after_a_checkpoint_by_wall_time_resumes_exactly(tmp_path: Path, reference: Path) -> None:
    """No step checkpoints (``--checkpoint-every 0``): the wall-time ones alone make kill -9 resumable,
    and a checkpoint holds adapters, anchors, optimizer and RNG, never the base weights."""
    run = tmp_path / "killed"
    proc = _train(*ARGS, "--checkpoint-every", "0", "--checkpoint-minutes", "0.002",
                  "--output-dir", str(tmp_path), "--run-name", "killed")  # fmt: skip
    _run_until(proc, run, 25)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (run / "final").exists()
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert saved  # with checkpoint.every 0, every checkpoint came from the clock
    assert sorted(p.name for p in saved[-1].iterdir()) == [
        "adapters.safetensors", "anchors.safetensors", "manifest.json", "optimizer.safetensors",
        "rng.safetensors", "state.json",
    ]  # fmt: skip
    result = _invoke("--resume", str(run))
    assert result.exit_code == 0, result.output
    _assert_same_run(run, reference)
