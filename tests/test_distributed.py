"""Several processes (gloo on the CPU): the same adapters as one process, rank 0 writing, clean failures.

The reference for exactness is the 1-process run with the *same global batch split the same way*:
``nproc=2, batch_size=4`` against ``nproc=1, batch_size=4, grad_accum=2`` with both micro-batches
feeding the restarts (``fullgrad.batches=2``). Every sum is then taken in the same order (a 2-rank
all-reduce adds two numbers, as gradient accumulation does), so the adapters, anchors and optimizer
state agree to the last bit across restarts (the test allows 1e-5).

Against ``nproc=1, batch_size=8`` (one micro-batch of 8) the gradients agree only to rounding
(~1e-7): the weight gradient sums 8 sequences at once instead of 4 + 4. That is enough for the
losses before the first aligned restart (checked to 1e-5), but not for the factors after it:
LAPACK's SVD signs are not continuous in its input (a 1e-7 relative change flips about one singular
vector in a thousand) and peso-r's restart rotates the Adam moments by the previous restart's
signs, so the two runs then follow different, equally valid trajectories.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pesocli.config import embedded_config_path, load_config
from pesocli.errors import ConfigError
from pesocli.train import run_training
from pesocli.train.distributed import World, check_supported, share

REPO = Path(__file__).resolve().parents[1]
STEPS = 7
COMMON = {
    "method.name": "peso-r", "method.restart_every": 3, "train.max_steps": STEPS, "optim.lr": 1e-2,
    "data.limit": 72, "data.val_split": 0.1, "train.quiet": True, "train.log_every": 1,
    "train.export": "none",
}  # fmt: skip
"""72 records, 7 held out: 65 training examples, so an epoch's last global batch of 8 holds one."""


def _settings(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PESO_DEBUG="0", PYTHONPATH=str(REPO))


def _peso(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pesocli.cli", "train", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_process(out: Path, name: str, **overrides) -> Path:
    cfg = load_config(
        embedded_config_path(),
        {**COMMON, "train.output_dir": str(out), "train.run_name": name, **overrides},
    )
    # one thread like the torchrun workers (_env): a matmul split over 2 threads rounds differently,
    # and restarts amplify that ~1e-7 into ~1e-5 by the end of the run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(cfg).run_dir
    finally:
        torch.set_num_threads(threads)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _eval_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def _max_difference(run: Path, reference: Path, name: str) -> float:
    """Largest absolute difference of the tensors of ``final/<name>.safetensors``, relative to their scale."""
    mine, theirs = (load_file(p / "final" / f"{name}.safetensors") for p in (run, reference))
    assert mine.keys() == theirs.keys()
    worst = 0.0
    for key, ref in theirs.items():
        assert mine[key].shape == ref.shape, key  # anchor ranks too
        if ref.numel():
            scale = max(float(ref.abs().max()), 1e-12)
            worst = max(worst, float((mine[key] - ref).abs().max()) / scale)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 2-process run (``peso train --nproc 2``) and its two 1-process references."""
    out = tmp_path_factory.mktemp("dist")
    two = _peso(
        "--nproc", "2", "--batch-size", "4", "--output-dir", str(out), "--run-name", "two",
        "--checkpoint-every", "4", *_settings(COMMON),
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return {
        "two": out / "two",
        "accum": _one_process(out, "accum", **{"train.batch_size": 4, "train.grad_accum": 2,
                                                 "fullgrad.batches": 2}),
        "wide": _one_process(out, "wide", **{"train.batch_size": 8}),
    }  # fmt: skip


def test_two_processes_train_the_same_adapters_as_one(runs: dict[str, Path]) -> None:
    two, accum = runs["two"], runs["accum"]
    for name in ("adapters", "anchors", "optimizer"):
        assert _max_difference(two, accum, name) <= 1e-5, name
    restarts = [json.loads(line) for line in (two / "restarts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in restarts}) == [1, 4, 7]  # the init and two aligned restarts (1-based)
    assert any(t.numel() for t in load_file(two / "final/anchors.safetensors").values())
    ours, theirs = _losses(two), _losses(accum)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step, loss in theirs.items():  # the 2-process loss is summed in FP32
        assert ours[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    assert _eval_losses(two) == pytest.approx(_eval_losses(accum), rel=1e-6)
    # the same global batch in one micro-batch: the same gradients up to rounding
    wide = _losses(runs["wide"])
    for step in (1, 2, 3):  # up to the first aligned restart (see the module docstring)
        assert ours[step] == pytest.approx(wide[step], rel=1e-5), step


def test_rank_0_writes_one_run_folder_with_every_ranks_rng(runs: dict[str, Path]) -> None:
    two = runs["two"]
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoints", "config.yaml", "final", "metrics.jsonl", "restarts.jsonl", "summary.json",
    ]  # fmt: skip
    assert load_config(two / "config.yaml").train.nproc == 2  # a resume starts 2 processes again
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    assert summary["tokens"] == json.loads((runs["accum"] / "summary.json").read_text())["tokens"]
    checkpoint = two / "checkpoints/step-000004"
    rng = load_file(checkpoint / "rng.safetensors")
    assert {"torch", "rank1.torch"} <= set(rng)
    state = json.loads((checkpoint / "state.json").read_text())
    assert len(state["rng"]["ranks"]) == 2
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len({line for line in lines})  # every step logged once, by rank 0


def test_every_rank_takes_its_share_of_the_global_batch() -> None:
    from pesocli.data import DataBundle
    from pesocli.data.build import DataStats
    from pesocli.data.encode import Example
    from pesocli.train.stream import BatchStream

    examples = [Example(input_ids=[1] * (2 + i % 5), labels=[-100] + [1] * (1 + i % 5)) for i in range(9)]
    stats = DataStats(path="", format="text", records=9, examples=9, tokens=0, trained_tokens=0, truncated=0,
                      dropped=0)
    bundle = DataBundle(train=examples, val=[], stats=stats, pad_token_id=0)
    whole = BatchStream(bundle, 4, seed=3, device=torch.device("cpu"))
    parts = [BatchStream(bundle, 2, seed=3, device=torch.device("cpu"), rank=r, world_size=2) for r in (0, 1)]
    assert whole.batches_per_epoch == parts[0].batches_per_epoch == 3
    for _ in range(4):  # into the second epoch; the third batch of each holds one example
        batch = whole.next()
        shares = [p.next() for p in parts]
        present = [s for s in shares if s is not None]
        rows = sum(s["input_ids"].shape[0] for s in present)
        assert rows == batch["input_ids"].shape[0]
        trained = sum(int((s["labels"] != -100).sum()) for s in present)
        assert trained == int((batch["labels"] != -100).sum())
    assert [share(1, r, 2) for r in (0, 1)] == [slice(0, 0), slice(0, 1)]
    assert [share(8, r, 2) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]


def test_a_placeholder_batch_adds_exactly_nothing() -> None:
    from pesocli.models import build_tiny_model, load_tiny_tokenizer
    from pesocli.train.loop import lm_loss
    from pesocli.train.stream import placeholder_batch

    tokenizer = load_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    loss = lm_loss(model, placeholder_batch(tokenizer.pad_token_id, torch.device("cpu")))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_what_several_processes_cannot_do_is_refused_in_one_line(tmp_path: Path) -> None:
    from pesocli.methods import method_class

    cfg = load_config(embedded_config_path(), {**COMMON, "train.nproc": 2, "train.output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="peso train --nproc 2"):
        run_training(cfg)  # not started by torchrun
    two = World(rank=0, size=2, active=True)
    lorsum = load_config(embedded_config_path(), {"method.name": "lorsum"})
    with pytest.raises(ConfigError, match="one process"):
        check_supported(lorsum, method_class("lorsum"), two)
    fsdp = load_config(embedded_config_path(), {"train.fsdp": True})
    with pytest.raises(ConfigError, match="--nproc"):
        check_supported(fsdp, method_class("peso-r"), World())
    quantised = load_config(embedded_config_path(), {"train.fsdp": True, "model.quant": "nf4"})
    with pytest.raises(ConfigError, match="bitsandbytes"):
        check_supported(quantised, method_class("peso-r"), two)


def test_the_launcher_exits_with_the_code_that_says_what_happened(capsys: pytest.CaptureFixture) -> None:
    from pesocli.train.distributed import _exit_code

    assert _exit_code({0: 1, 1: -9}) == 137  # a killed process cannot say why: the launcher does
    assert "process 1 was killed by SIGKILL" in capsys.readouterr().err
    assert _exit_code({1: 2, 0: 2}) == 2  # a config error on every rank
    assert _exit_code({0: 143, 1: -15}) == 143  # rank 0 checkpointed; rank 1 was stopped after it
    assert _exit_code({0: -15}) == 143
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------------- processes without torchrun

WORKER = textwrap.dedent(
    """
    # One process of a 2-process run started without torchrun's agent (nothing kills the survivors),
    # with a fault injected on rank 1: "die" raises in the 2nd step, "hang" sleeps there,
    # "sigterm" sends itself SIGTERM after the 2nd step.
    import os, signal, sys, time
    import pesocli.train.loop as loop
    from pesocli.cli import main
    from pesocli.train.progress import Reporter

    fault, rank = os.environ["FAULT"], int(os.environ["RANK"])
    calls = {"n": 0}
    real_loss, real_step = loop.lm_loss, Reporter.step

    def lm_loss(model, batch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            if fault == "die":
                raise RuntimeError("injected failure on rank 1")
            if fault == "hang":
                time.sleep(120)
        return real_loss(model, batch)

    def step(self, index, metrics):
        real_step(self, index, metrics)
        if rank == 1 and fault == "sigterm" and index == 1:
            signal.raise_signal(signal.SIGTERM)

    loop.lm_loss, Reporter.step = lm_loss, step
    main(["train", *sys.argv[1:]], prog_name="peso")
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_two(tmp_path: Path, fault: str, *args: str) -> list[subprocess.Popen]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(_env(), FAULT=fault, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, str(worker), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    deadline = time.monotonic() + timeout
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            out.append((None, err))
            continue
        out.append((proc.returncode, err))
    return out


def test_a_process_that_dies_ends_the_other_at_once_with_one_line(tmp_path: Path) -> None:
    args = ["--batch-size", "4", "--output-dir", str(tmp_path / "runs"), "--run-name", "r",
            *_settings({**COMMON, "train.dist_timeout": 600})]  # fmt: skip
    started = time.monotonic()
    (code0, err0), (code1, err1) = _finish(_start_two(tmp_path, "die", *args), timeout=900)
    assert code1 == 1 and "injected failure on rank 1" in err1, (code1, err1)
    assert code0 == 1, err0
    assert time.monotonic() - started < 400  # gloo sees the dead peer at once; no 600 s timeout is waited
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: process 0:") and "stopped" in lines[0], err0
    assert not (tmp_path / "runs/r").exists()  # a fresh run with nothing to resume leaves nothing


LEAVER = textwrap.dedent(
    """
    # One process that torchrun could have started (RANK/WORLD_SIZE set, a gloo group of one):
    # an atexit handler shows whether the interpreter's teardown ran.
    import atexit, sys
    import pesocli.train.loop as loop
    from pesocli.cli import main

    atexit.register(lambda: print("interpreter teardown ran", file=sys.stderr, flush=True))
    if sys.argv[1] == "fail":
        def lm_loss(model, batch):
            raise RuntimeError("injected failure")
        loop.lm_loss = lm_loss
    main(["train", *sys.argv[2:]], prog_name="peso")
    """
)


@pytest.mark.parametrize("outcome", ["finish", "fail"])
def test_a_process_torchrun_started_ends_without_interpreter_teardown(tmp_path: Path, outcome: str) -> None:
    """Gloo's threads outlive destroy_process_group and died of SIGABRT in the interpreter's teardown
    now and then (see ``distributed.leave_now``); such a process must skip it, and still print all."""
    worker = tmp_path / "leaver.py"
    worker.write_text(LEAVER)
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))  # fmt: skip
    args = ["--output-dir", str(tmp_path / "runs"), "--run-name", "r", "--max-steps", "2",
            *_settings({**COMMON, "train.quiet": False})]  # fmt: skip
    done = subprocess.run([sys.executable, str(worker), outcome, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "interpreter teardown ran" not in done.stderr
    if outcome == "finish":
        assert done.returncode == 0, done.stderr[-3000:]
        assert "step 2/2" in done.stdout + done.stderr  # printed output is flushed before leaving
        assert (tmp_path / "runs/r/final").is_dir()
    else:
        assert done.returncode == 1, done.stderr[-3000:]
        assert done.stderr.rstrip().endswith("RuntimeError: injected failure")  # the bug's traceback


@pytest.mark.slow
def test_a_process_that_hangs_times_the_other_out(tmp_path: Path) -> None:
    args = ["--batch-size", "4", "--output-dir", str(tmp_path / "runs"), "--run-name", "r",
            *_settings({**COMMON, "train.dist_timeout": 5})]  # fmt: skip
    procs = _start_two(tmp_path, "hang", *args)
    code0, err0 = _finish(procs[:1], timeout=90)[0]
    procs[1].kill()
    procs[1].communicate()
    assert code0 == 1 and err0.strip().startswith("error: process 0:"), err0


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_after_the_same_step_and_resume_is_exact(tmp_path: Path) -> None:
    """Dropout on: the ranks' RNGs differ, so the resumed run matches only if each rank's RNG is restored."""
    settings = _settings({**COMMON, "method.dropout": 0.1, "train.max_steps": 9, "train.nproc": 2})
    args = ["--batch-size", "4", "--output-dir", str(tmp_path / "runs"), *settings]
    reference = _peso(*args, "--run-name", "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]

    (code0, err0), (code1, err1) = _finish(_start_two(tmp_path, "sigterm", *args, "--run-name", "r"), 120)
    run = tmp_path / "runs/r"
    assert (code0, code1) == (143, 143), err0 + err1
    assert "SIGTERM after step 3 of 9" in err0 and "error:" not in err1  # rank 0 says it once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000003"]

    resumed = _peso("--resume", str(run))  # the run's config.yaml says nproc 2: two processes again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run) == pytest.approx(_losses(tmp_path / "runs/ref"), rel=1e-6)
    for name in ("adapters", "anchors", "optimizer"):
        assert _max_difference(run, tmp_path / "runs/ref", name) <= 1e-6, name


@pytest.mark.slow
def test_fsdp2_with_gradient_checkpointing_trains_the_same_adapters(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    result = _peso(
        "--nproc", "2", "--fsdp", "--gradient-checkpointing", "--batch-size", "4",
        "--output-dir", str(tmp_path), "--run-name", "fsdp", *_settings(COMMON),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapters", "anchors", "optimizer"):
        assert _max_difference(tmp_path / "fsdp", runs["accum"], name) <= 1e-5, name
    assert json.loads((tmp_path / "fsdp/summary.json").read_text())["processes"] == 2

