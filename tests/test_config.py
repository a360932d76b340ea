"""The config tree: precedence (command line > YAML > defaults), coercion, errors, method switch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pesocli.config import (
    DEFAULT_METHOD,
    EMBEDDED_CONFIG,
    SECTIONS,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    commands_dir,
    config_from_dict,
    config_to_dict,
    describe_default,
    embedded_config_path,
    load_config,
    save_config,
)
from pesocli.errors import ConfigError
from pesocli.methods import METHODS


def write_yaml(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_come_from_the_dataclasses() -> None:
    cfg = load_config(None, {})
    assert cfg.method_name == DEFAULT_METHOD
    assert type(cfg.method) is METHODS[DEFAULT_METHOD].Config
    assert cfg.model == ModelConfig()
    assert cfg.optim == OptimConfig()
    assert dataclasses.replace(cfg.train, run_name=None) == TrainConfig()
    assert cfg.train.run_name.startswith(f"{DEFAULT_METHOD}-")
    assert cfg.run_dir == Path("runs") / cfg.train.run_name


def test_command_line_beats_yaml_beats_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"optim": {"lr": 1e-3, "weight_decay": 0.1}, "train": {"batch_size": 4}})
    cfg = load_config(path, {"optim.lr": 5e-4, "train.seed": "7"})
    assert cfg.optim.lr == 5e-4  # command line
    assert cfg.optim.weight_decay == 0.1  # YAML
    assert cfg.train.batch_size == 4  # YAML
    assert cfg.train.seed == 7  # command line, coerced from a string
    assert cfg.optim.beta2 == OptimConfig().beta2  # default


def test_yaml_strings_are_coerced(tmp_path: Path) -> None:
    # PyYAML reads "2e-4" (no dot) as a string; it must still become a float.
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 2e-4\ntrain:\n  max_steps: 1e3\n", encoding="utf-8")
    cfg = load_config(path, {})
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.max_steps == 1000


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("model.trust_remote_code", "true", True),
        ("train.quiet", "no", False),
        ("train.max_steps", "none", None),
        ("train.max_steps", "12", 12),
        ("train.epochs", "2", 2.0),
        ("train.run_name", "abc", "abc"),
        ("method.target_modules", "q_proj, v_proj", ("q_proj", "v_proj")),
        ("method.target_modules", ["q_proj"], ("q_proj",)),
        ("data.val_path", "null", None),
    ],
)
def test_set_values_are_coerced_to_the_field_type(key: str, raw: object, expected: object) -> None:
    cfg = load_config(None, {key: raw})
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key \(did you mean optim\.lr\?\)"):
        load_config(None, {"optim.lrr": 1e-3})
    path = write_yaml(tmp_path, {"train": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"train\.batchsize: unknown key \(did you mean train\.batch_size"):
        load_config(path, {})


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean optim\?"):
        load_config(None, {"optm.lr": 1e-3})
    path = write_yaml(tmp_path, {"trian": {"seed": 1}})
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown section 'trian' \(did you mean train\?\)"):
        load_config(path, {})


def test_wrong_type_names_field_type_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"train.batch_size": "eight"})
    assert str(info.value) == "train.batch_size: expected int, got 'eight'"
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code: expected bool, got 'maybe'"):
        load_config(None, {"model.trust_remote_code": "maybe"})


def test_all_bad_fields_are_reported_in_one_error_one_line_each(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"optim": {"lr": -1.0, "scheduler": "step"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, {"train.batch_size": 0, "method.rank": 0, "optim.eps": "x"})
    lines = str(info.value).splitlines()
    assert lines[0] == "5 problems in the configuration:"
    body = "\n".join(lines[1:])
    for field in ("optim.lr", "optim.scheduler", "train.batch_size", "method.rank", "optim.eps"):
        assert sum(field in line for line in lines[1:]) == 1, (field, body)


def test_unknown_method_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"method.name": "nope"})
    for name in METHODS:
        assert name in str(info.value)


def test_method_name_switches_the_section_class_before_its_fields() -> None:
    cfg = load_config(None, {"method.rank": 4, "method.name": "lora"})
    assert cfg.method_name == "lora"
    assert type(cfg.method) is METHODS["lora"].Config
    assert cfg.method.rank == 4


def test_fields_of_another_method_are_an_error_naming_their_owner() -> None:
    with pytest.raises(ConfigError, match=r"method\.restart_every: method lora has no such field.*peso-r"):
        load_config(None, {"method.name": "lora", "method.restart_every": 10})


def test_command_line_method_drops_yaml_fields_of_the_yaml_method(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"method": {"name": "peso-r", "rank": 4, "restart_every": 50}})
    cfg = load_config(path, {"method.name": "lora"})
    assert cfg.method_name == "lora"
    assert cfg.method.rank == 4  # shared fields carry over
    # a typo in the YAML is still an error after the switch
    path = write_yaml(tmp_path, {"method": {"name": "peso-r", "rnak": 4}})
    with pytest.raises(ConfigError, match=r"did you mean method\.rank"):
        load_config(path, {"method.name": "lora"})


def test_unknown_quantisation_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.quant"):
        load_config(None, {"model.quant": "nf3"})


def test_bad_yaml_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path, {})
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path, {})


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, {"method.name": "peso-t", "method.target_modules": "q_proj,v_proj",
                             "optim.lr": 3e-4, "train.max_steps": 10, "data.limit": 5})
    data = config_to_dict(cfg)
    assert list(data) == list(SECTIONS)
    assert next(iter(data["method"])) == "name" and data["method"]["name"] == "peso-t"
    assert data["method"]["target_modules"] == ["q_proj", "v_proj"]
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(path, {}) == cfg
    assert config_from_dict(data) == cfg


def test_run_config_validate_catches_a_foreign_method_config() -> None:
    cfg = RunConfig(method_name="lora", method=METHODS["peso-r"].Config())
    assert any("not the config of lora" in line for line in cfg.validate())


def test_describe_default_reads_the_dataclasses() -> None:
    assert describe_default("optim.lr") == str(OptimConfig().lr)
    assert describe_default("method.name") == DEFAULT_METHOD
    assert describe_default("method.rank") == "8"
    assert "peso-r: 500" in describe_default("method.restart_every")


def test_embedded_config_is_the_tiny_run() -> None:
    assert embedded_config_path().name == EMBEDDED_CONFIG
    cfg = load_config(embedded_config_path(), {})
    assert cfg.model.name == "tiny"
    assert cfg.data.path is None


COMMAND_FILES = sorted(commands_dir().glob("*.yaml"))


def test_there_are_ready_made_configs() -> None:
    names = {path.stem for path in COMMAND_FILES}
    for stem in ("tiny-peso-r", "tiny-lora", "llama-3.1-8b-peso-r", "llama-3.1-8b-peso-t",
                 "llama-3.1-8b-lora", "llama-3.1-8b-lorsum", "llama-3.1-8b-peso-r-nf4", "llama-2-7b-peso-r"):
        assert stem in names


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: p.name)
def test_every_ready_made_config_loads_and_validates(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "each file starts with a comment saying what it runs"
    assert "peso train" in text.split("\nmodel:")[0], "the header shows the command"
    raw = yaml.safe_load(text)
    method = raw.get("method", {}).get("name", DEFAULT_METHOD)
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    try:
        cfg = load_config(path, {})
    except ConfigError as exc:
        if raw.get("model", {}).get("quant", "none") != "none" and "[scale]" in str(exc):
            pytest.skip("quantised backbones arrive with [scale]")
        raise
    assert cfg.method_name == method


def test_paper_hyperparameters_in_the_8b_configs() -> None:
    cfg = load_config(commands_dir() / "llama-3.1-8b-peso-r.yaml", {})
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.scheduler, cfg.optim.warmup_ratio) == (
        2e-4, 0.0, "cosine", 0.03)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
    assert cfg.train.batch_size * cfg.train.grad_accum == 32
    assert cfg.data.max_length == 1024 and cfg.train.epochs == 1.0
    m = cfg.method
    assert (m.rank, m.alpha, m.tau1, m.tau2, m.restart_every, m.gamma) == (8, 16.0, 0.9, 0.9, 500, 128.0)
    assert load_config(commands_dir() / "llama-3.1-8b-peso-t.yaml", {}).method.subspace_every == 1
