"""The ``peso`` group and ``peso train`` option parsing (the trainer itself is replaced by a fake)."""

from __future__ import annotations

import subprocess
import sys
import types

import click
import pytest
import torch
from click.testing import CliRunner

from pesocli import __version__
from pesocli.cli import main
from pesocli.cli.common import report_failure, run_command
from pesocli.cli.train import CONFIG_FLAGS, CONFIG_OPTIONS
from pesocli.config import commands_dir
from pesocli.errors import ModelError


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace ``pesocli.train`` so ``peso train`` only records the config it would run."""
    from pesocli.train import distributed  # the real one: train asks it whether torchrun started us

    calls: list = []
    module = types.ModuleType("pesocli.train")
    module.run_training = lambda cfg, **kwargs: calls.append((cfg, kwargs))  # type: ignore[attr-defined]
    module.distributed = distributed  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pesocli.train", module)
    return calls


def test_help_lists_train() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output


def test_importing_the_cli_imports_no_torch() -> None:
    code = "import sys, pesocli.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "pesocli.cli", "--help"], check=True, capture_output=True,
                         text=True).stdout
    assert "Usage: peso" in out


def test_version_reports_the_stack() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert f"peso {__version__}" in result.output
    assert f"torch {torch.__version__}" in result.output
    for name in ("transformers", "peft", "bitsandbytes", "python"):
        assert f"\n{name} " in result.output


def test_train_help_documents_every_option() -> None:
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # a long key may wrap inside the help column
    for option, key, *_ in (*CONFIG_OPTIONS, *CONFIG_FLAGS):
        assert option in result.output
        assert f"config: {key}; default:" in text
    for option in ("--config", "--set", "--dry-run", "--restart-every"):
        assert option in result.output


def test_bad_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["train", "--no-such-option"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["train", "--rank", "eight"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["train", "--set", "optim.lr"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_peso_error_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command()
    @run_command
    def boom() -> None:
        raise ModelError("model foo is not here")

    monkeypatch.delenv("PESO_DEBUG", raising=False)
    result = CliRunner().invoke(boom, [])
    assert result.exit_code == ModelError.exit_code
    assert result.stderr == "error: model foo is not here\n"
    assert "Traceback" not in result.output

    monkeypatch.setenv("PESO_DEBUG", "1")
    result = CliRunner().invoke(boom, [])
    assert isinstance(result.exception, ModelError)


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command()
    @run_command
    def stop() -> None:
        raise KeyboardInterrupt

    monkeypatch.delenv("PESO_DEBUG", raising=False)
    assert CliRunner().invoke(stop, []).exit_code == 130


def test_report_failure_says_what_run_command_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failing process of a multi-process run reports through this before it leaves at once."""
    monkeypatch.delenv("PESO_DEBUG", raising=False)
    assert report_failure(ModelError("model foo is not here")) == ModelError.exit_code
    assert capsys.readouterr().err == "error: model foo is not here\n"
    assert report_failure(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted\n"
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        assert report_failure(exc) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith("RuntimeError: a bug")
    assert report_failure(SystemExit(3)) == 3 and report_failure(SystemExit()) == 0
    assert report_failure(SystemExit("bye")) == 1 and capsys.readouterr().err == "bye\n"
    monkeypatch.setenv("PESO_DEBUG", "1")
    try:
        raise ModelError("model foo is not here")
    except ModelError as exc:
        assert report_failure(exc) == ModelError.exit_code
    assert capsys.readouterr().err.startswith("Traceback")


def test_config_error_from_train(fake_training: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PESO_DEBUG", raising=False)
    result = CliRunner().invoke(main, ["train", "--method", "nope"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: method.name: unknown method 'nope'")
    assert "peso-r" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train", "--method", "lora", "--restart-every", "10"])
    assert result.exit_code == 2
    assert "method.restart_every: method lora has no such field" in result.stderr
    assert not fake_training


def test_train_without_config_uses_the_embedded_tiny_run(fake_training: list) -> None:
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 0, result.output
    (cfg, kwargs), = fake_training
    assert kwargs == {"dry_run": False}
    assert (cfg.model.name, cfg.method_name) == ("tiny", "peso-r")


def test_command_line_overrides_the_yaml(fake_training: list) -> None:
    args = ["train", "--config", str(commands_dir() / "tiny-lora.yaml"), "--lr", "1e-3", "--rank", "4",
            "--set", "train.seed=7", "--set", "optim.lr=5", "--quiet", "--trust-remote-code", "--dry-run",
            "--max-steps", "3", "--run-name", "x"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (cfg, kwargs), = fake_training
    assert kwargs == {"dry_run": True}
    assert cfg.method_name == "lora"
    assert cfg.optim.lr == 1e-3  # named options win over --set
    assert (cfg.method.rank, cfg.train.seed, cfg.train.max_steps, cfg.train.run_name) == (4, 7, 3, "x")
    assert cfg.train.quiet and cfg.model.trust_remote_code


def test_method_switch_from_the_command_line(fake_training: list) -> None:
    result = CliRunner().invoke(main, ["train", "--method", "lora"])
    assert result.exit_code == 0, result.output
    assert fake_training[0][0].method_name == "lora"
    result = CliRunner().invoke(main, ["train", "--restart-every", "25"])
    assert result.exit_code == 0, result.output
    assert fake_training[1][0].method.restart_every == 25


def test_method_help_names_every_registered_method() -> None:
    import importlib

    from pesocli.methods import METHODS

    options = importlib.import_module("pesocli.cli.train").CONFIG_OPTIONS
    method_help = next(text for option, _key, _kind, text in options if option == "--method")
    assert all(name in method_help for name in METHODS), method_help


def test_a_model_folder_without_config_gets_the_documented_defaults(fake_training: list, tmp_path) -> None:
    """The tiny demo's YAML (lr 1e-2, 300 steps, restart_every 100) applies to the tiny model only."""
    from pesocli.config import CheckpointConfig, OptimConfig, TrainConfig
    from pesocli.data.config import DataConfig

    model = tmp_path / "my-model"
    model.mkdir()
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--data", "x.jsonl"])
    assert result.exit_code == 0, result.output
    cfg = fake_training[0][0]
    assert cfg.model.name == str(model)
    assert cfg.optim.lr == OptimConfig().lr == 2e-4  # what --help advertises
    assert cfg.method.restart_every == 500 and cfg.method_name == "peso-r"
    assert cfg.train.max_steps is None and cfg.train.epochs == TrainConfig().epochs
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert (cfg.data.max_length, cfg.data.val_split) == (DataConfig().max_length, DataConfig().val_split)
    assert cfg.checkpoint.every == CheckpointConfig().every
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "default: 0.0002" in help_text and "peso-r: 500" in help_text

    for args in ([], ["--model", "tiny"]):  # the embedded demo: no --model, or the tiny one named
        assert CliRunner().invoke(main, ["train", *args]).exit_code == 0
        cfg = fake_training[-1][0]
        assert (cfg.optim.lr, cfg.train.max_steps, cfg.method.restart_every) == (1e-2, 300, 100)


def test_describe_plan_counts_epochs_and_tokens_and_warns_past_a_few_epochs() -> None:
    from pesocli.train.progress import describe_plan

    line, warning = describe_plan(300, 16, 1425, 53832)
    assert "300 steps x 16 sequences = 3.37 epochs over 1,425 examples" in line
    assert "about 181,329 tokens" in line  # 4800 / 1425 passes over 53,832 tokens
    assert warning is None
    line, warning = describe_plan(300, 16, 2, 60)
    assert "2,400.00 epochs" in line
    assert warning is not None and "2,400.0 passes over 2 training examples" in warning


def test_shipped_configs_by_name_list_and_copy(fake_training: list, tmp_path, monkeypatch) -> None:
    """``--config NAME`` from any working directory; ``peso configs`` lists, ``peso configs cp`` copies."""
    from pesocli.config import shipped_configs

    monkeypatch.chdir(tmp_path)  # not the repo root: names must still resolve
    for name in ("smollm2-135m-peso-r", "smollm2-135m-peso-r.yaml"):
        result = CliRunner().invoke(main, ["train", "--config", name])
        assert result.exit_code == 0, result.output
        cfg = fake_training[-1][0]
        assert (cfg.model.name, cfg.method_name) == ("smollm2-135m", "peso-r")
    wrong = CliRunner().invoke(main, ["train", "--config", "smollm-135m-peso-r"])
    assert wrong.exit_code == 2 and "did you mean smollm2-135m-peso-r?" in wrong.output
    assert wrong.output.count("\n") == 1 and len(fake_training) == 2

    assert "cp" in CliRunner().invoke(main, ["configs", "--help"]).output
    assert "DEST" in CliRunner().invoke(main, ["configs", "cp", "--help"]).output
    listed = CliRunner().invoke(main, ["configs"])
    assert listed.exit_code == 0
    names = [line.split()[0] for line in listed.output.splitlines()[: len(shipped_configs())]]
    assert names == list(shipped_configs()) and "tiny-peso-r" in names and "llama-3.1-8b-peso-r" in names
    copied = CliRunner().invoke(main, ["configs", "cp", "tiny-lora", "mine.yaml"])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "mine.yaml").read_text() == shipped_configs()["tiny-lora"].read_text()
    again = CliRunner().invoke(main, ["configs", "cp", "tiny-lora", "mine.yaml"])
    assert again.exit_code == 2 and "--force" in again.output
    (tmp_path / "dir").mkdir()
    assert CliRunner().invoke(main, ["configs", "cp", "tiny-lora", "dir"]).exit_code == 0
    assert (tmp_path / "dir" / "tiny-lora.yaml").is_file()
    assert CliRunner().invoke(main, ["configs", "cp", "nope", "x.yaml"]).exit_code == 2
    result = CliRunner().invoke(main, ["train", "--config", "mine.yaml"])  # a file still wins
    assert result.exit_code == 0 and fake_training[-1][0].method_name == "lora"


def test_shipped_configs_are_package_data() -> None:
    """``commands/*.yaml`` install with the package (``pesocli._commands``), so names work from a wheel."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"pesocli._commands" = "commands"' in text and '"pesocli._commands" = ["*.yaml"]' in text
