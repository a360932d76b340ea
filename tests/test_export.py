"""``peso export`` / ``peso merge``: every format reloaded from disk with plain transformers (+ peft)
reproduces the trained model's logits; full module paths on a GQA Qwen2; every ``--check`` rule.

Runs are real (tiny Llama or Qwen2, a few steps on the shipped data), one per method in
``METHODS`` (so a new method is covered by adding it there), trained once per module.
The reference is the trained model rebuilt in memory by ``load_run`` (``tests/test_runs.py`` pins
that to the model that training left behind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from pesocli.cli import main
from pesocli.config import embedded_config_path, load_config
from pesocli.errors import PesoError
from pesocli.export import ExportOptions, check_path, export_run, merge_run
from pesocli.export.compress import ALLOWED_RANKS, fit_rank
from pesocli.export.convert import LoRAPair, stack
from pesocli.methods import METHODS
from pesocli.runs import load_run
from pesocli.train import run_training

TOL = 1e-4
"""Relative logits error every FP32 export must stay within."""

QUICK = {
    "train.max_steps": 10,
    "train.batch_size": 4,
    "train.quiet": True,
    "train.eval_every": 0,
    "data.val_split": 0.0,
    "data.limit": 64,
    "train.device": "cpu",
}


def _method_overrides(name: str) -> dict:
    """Every method with a restart/subspace schedule restarts before steps 0, 4 and 8 of 10."""
    fields = METHODS[name].Config.field_names()
    return {"method.name": name, **({"method.restart_every": 4} if "restart_every" in fields else {})}


RUNS = {name: _method_overrides(name) for name in METHODS}
"""One short run per method: lora, peso-r (3 restarts), peso-t, lorsum, ... (every ``METHODS`` entry)."""


def _train(root: Path, name: str, **overrides) -> Path:
    cfg = load_config(embedded_config_path(),
                      {**QUICK, "train.output_dir": str(root), "train.run_name": name, **overrides})
    return run_training(cfg).run_dir


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {name: _train(root, name, **overrides) for name, overrides in RUNS.items()}


@pytest.fixture(scope="module")
def loaded(run_dirs):
    return {name: load_run(path) for name, path in run_dirs.items()}


def tokens(vocab: int = 400) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


def reload(folder: Path, adapter: Path | None = None):
    """What a user does: transformers, plus peft for an adapter; nothing from peso."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").eval()
    return PeftModel.from_pretrained(model, str(adapter)).eval() if adapter is not None else model


@torch.no_grad()
def without_delta_logits(run, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``W0 + anchor``: every trainable delta zeroed for the call, then restored."""
    params = [p for layer in run.engine.layers.values() for p in layer.delta.parameters()]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.zero_()
    try:
        return model_logits(run.model, ids)
    finally:
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)


def opts(**kwargs) -> ExportOptions:
    return ExportOptions(verify=False, **kwargs)


# ----------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("method", list(RUNS))
def test_every_format_reloads_to_the_trained_logits(loaded, tmp_path: Path, method: str) -> None:
    run = loaded[method]
    ids = tokens()
    reference = model_logits(run.model, ids)
    if method == "peso-r":
        assert max(layer.anchor.rank for layer in run.engine.layers.values()) > 0

    anchored = export_run(run, "anchored", tmp_path / "anchored", opts()).out
    adapter = export_run(run, "adapter", tmp_path / "adapter", opts()).out
    merged = export_run(run, "merged", tmp_path / "merged", opts()).out
    errors = {
        "anchored": rel(model_logits(reload(anchored / "model", anchored / "adapter"), ids), reference),
        "adapter": rel(model_logits(reload(adapter / "base", adapter), ids), reference),
        "merged": rel(model_logits(reload(merged), ids), reference),
    }
    assert max(errors.values()) < TOL, errors
    for out in (anchored, adapter, merged):
        assert check_path(out) == []
    # The adapter export's base is the untouched W0: without the adapter it is the pretrained model.
    untouched = model_logits(reload(adapter / "base"), ids)
    assert rel(untouched, reference) > 10 * TOL


@pytest.mark.parametrize("method", list(RUNS))
def test_merge_reloads_to_the_anchored_and_the_full_logits(loaded, tmp_path: Path, method: str) -> None:
    run = loaded[method]
    ids = tokens()
    merge_run(run, tmp_path / "w", options=opts())
    merge_run(run, tmp_path / "full", include_adapter=True, options=opts())
    assert rel(model_logits(reload(tmp_path / "w"), ids), without_delta_logits(run, ids)) < TOL
    assert rel(model_logits(reload(tmp_path / "full"), ids), model_logits(run.model, ids)) < TOL
    assert check_path(tmp_path / "w") == [] and check_path(tmp_path / "full") == []


def test_export_reports_its_own_reloaded_logits_error(loaded, tmp_path: Path) -> None:
    lines: list[str] = []
    result = export_run(loaded["peso-r"], "anchored", tmp_path / "x", ExportOptions(), say=lines.append)
    assert set(result.logits_error) == {"model + adapter"}
    assert result.logits_error["model + adapter"] < TOL
    assert any("relative error" in line for line in lines)
    assert json.loads((tmp_path / "x" / "peso_export.json").read_text())["logits_relative_error"]


def test_adapter_stacks_anchor_and_adapter_exactly_at_an_allowed_rank(loaded, tmp_path: Path) -> None:
    run = loaded["peso-r"]
    result = export_run(run, "adapter", tmp_path / "a", opts())
    anchor = max(layer.anchor.rank for layer in run.engine.layers.values())
    assert result.fit.exact_rank == anchor + run.cfg.method.rank
    assert result.fit.rank in ALLOWED_RANKS and result.fit.rank >= result.fit.exact_rank
    assert not result.fit.lossy
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == result.fit.rank
    assert config["use_dora"] is False and config["bias"] == "none" and config["modules_to_save"] is None
    assert f"--max-lora-rank {result.fit.rank}" in result.serve.command()


def test_wide_adapter_is_compressed_and_refused_past_the_threshold(loaded, tmp_path: Path) -> None:
    run = loaded["peso-r"]
    with pytest.raises(PesoError, match="--allow-lossy"):
        export_run(run, "adapter", tmp_path / "refused", opts(max_rank=8, max_error=1e-6))
    assert not (tmp_path / "refused").exists()
    lines: list[str] = []
    result = export_run(run, "adapter", tmp_path / "lossy", opts(max_rank=8, allow_lossy=True),
                        say=lines.append)
    assert result.fit.rank == 8 and result.fit.lossy
    assert set(result.fit.errors) == set(run.engine.layers)
    assert all(0 < e < 1 for e in result.fit.errors.values())
    assert sum("model.layers." in line for line in lines) == len(run.engine.layers)  # one line per layer
    assert any("logits relative error" in line for line in lines)
    manifest = json.loads((tmp_path / "lossy" / "peso_export.json").read_text())
    assert manifest["ranks"]["lossy"] and manifest["layer_errors"]
    assert check_path(tmp_path / "lossy") == []


def test_fit_rank_pads_exactly_and_truncates_like_a_dense_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = {"a": LoRAPair(torch.randn(5, 30, generator=gen), torch.randn(20, 5, generator=gen)),
             "b": LoRAPair(torch.randn(12, 30, generator=gen), torch.randn(20, 12, generator=gen))}
    exact = fit_rank(pairs)
    assert exact.rank == 16 and not exact.lossy
    for name, pair in pairs.items():
        assert torch.allclose(exact.pairs[name].weight(), pair.weight(), atol=1e-6)
    cut = fit_rank(pairs, max_rank=10)  # largest allowed <= 10 is 8
    assert cut.rank == 8 and set(cut.errors) == {"b"}
    dense = pairs["b"].weight().double()
    s = torch.linalg.svdvals(dense)
    expected = float(s[8:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
    assert cut.errors["b"] == pytest.approx(expected, rel=1e-6)
    best = torch.linalg.svd(dense)
    reference = (best.U[:, :8] * best.S[:8]) @ best.Vh[:8]
    assert torch.allclose(cut.pairs["b"].weight().double(), reference, atol=1e-4)
    both = stack(pairs["a"], pairs["b"])
    assert torch.allclose(both.weight(), pairs["a"].weight() + pairs["b"].weight(), atol=1e-5)


def test_bf16_export_is_bf16_everywhere(loaded, tmp_path: Path) -> None:
    run = loaded["lora"]
    export_run(run, "anchored", tmp_path / "x", opts(dtype="bf16"))
    config = json.loads((tmp_path / "x" / "model" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    shards = [load_file(p) for p in (tmp_path / "x" / "model").glob("*.safetensors")]
    assert {t.dtype for shard in shards for t in shard.values()} == {torch.bfloat16}
    adapter = load_file(tmp_path / "x" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert check_path(tmp_path / "x") == []
    ids = tokens()
    error = rel(model_logits(reload(tmp_path / "x" / "model", tmp_path / "x" / "adapter"), ids),
                model_logits(run.model, ids))
    assert error < 3e-2  # bf16 rounding, not a bug


def test_model_folder_is_sharded_with_an_index_and_vllm_ready(loaded, tmp_path: Path) -> None:
    run = loaded["lora"]
    export_run(run, "merged", tmp_path / "m", opts(max_shard_bytes=200_000))
    folder = tmp_path / "m"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = run.tokenizer.eos_token_id
    assert eos in ([generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int)
                   else generation["eos_token_id"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template and tokenizer.eos_token_id == eos
    ids = tokens()
    assert rel(model_logits(reload(folder), ids), model_logits(run.model, ids)) < TOL
    assert check_path(folder) == []


def test_manifest_readme_and_serve_script(loaded, run_dirs, tmp_path: Path) -> None:
    result = export_run(loaded["peso-r"], "anchored", tmp_path / "x", opts(adapter_name="arith"))
    out = tmp_path / "x"
    manifest = json.loads((out / "peso_export.json").read_text())
    assert manifest["method"] == "peso-r" and manifest["format"] == "anchored"
    assert manifest["restarts"] >= 3  # steps 0, 4, 8
    assert manifest["source"]["run"] == str(run_dirs["peso-r"].resolve())
    assert manifest["source"]["step"] == 10
    assert manifest["ranks"]["anchor_rank_max"] > 0 and manifest["ranks"]["adapter_r"] == 8
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"peso_export.json"}
    assert set(manifest["files"]) == files
    readme = (out / "README.md").read_text()
    command = (f"vllm serve {out.resolve() / 'model'} --dtype float32 --enable-lora "
               f"--lora-modules arith={out.resolve() / 'adapter'} --max-lora-rank 8")
    assert result.serve.command() == command
    assert command in readme and command in (out / "serve.sh").read_text()
    assert "LoRARequest('arith', 1," in readme and "enable_lora=True" in readme
    assert "$" not in readme.replace("$@", "")  # every placeholder filled
    (out / "README.md").write_text(readme + "edited\n")
    assert any("sha256" in p for p in check_path(out))


def test_output_is_atomic_and_refuses_to_overwrite(loaded, tmp_path: Path) -> None:
    run = loaded["lora"]
    export_run(run, "merged", tmp_path / "m", opts())
    with pytest.raises(PesoError, match="--force"):
        export_run(run, "merged", tmp_path / "m", opts())
    export_run(run, "merged", tmp_path / "m", opts(force=True))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    with pytest.raises(PesoError, match="run folder"):
        export_run(run, "merged", run.run_dir, opts(force=True))


# ------------------------------------------------------------------------- GQA full paths


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    from pesocli.models import load_tiny_tokenizer, tiny_model_config

    root = tmp_path_factory.mktemp("qwen2")
    tokenizer = load_tiny_tokenizer()
    config = tiny_model_config("qwen2", len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    model.save_pretrained(str(root / "base"))
    tokenizer.save_pretrained(str(root / "base"))
    return _train(root, "run", **{"model.name": str(root / "base"), "method.name": "peso-r",
                                  "method.restart_every": 4})


def test_qwen2_gqa_exports_with_full_module_paths(qwen2_run: Path, tmp_path: Path) -> None:
    run = load_run(qwen2_run)
    base = run.cfg.model.name
    ids = tokens()
    reference = model_logits(run.model, ids)
    result = export_run(run, "adapter", tmp_path / "a", opts())
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    modules = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in weights}
    assert modules == set(run.engine.layers)
    assert "model.layers.0.self_attn.k_proj" in modules  # the full path, with "model."
    layer = run.engine.layers["model.layers.0.self_attn.k_proj"]
    assert layer.out_features < run.engine.layers["model.layers.0.self_attn.q_proj"].out_features  # GQA
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    assert tuple(weights[key].shape) == (layer.out_features, result.fit.rank)
    manifest = json.loads((tmp_path / "a" / "peso_export.json").read_text())
    assert manifest["parts"]["adapter_base_external"] == str(Path(base).resolve())
    assert not (tmp_path / "a" / "base").exists()  # a real base is referenced, not copied
    assert str(Path(base).resolve()) in result.serve.command()
    assert rel(model_logits(reload(Path(base), tmp_path / "a"), ids), reference) < TOL
    # Qwen2's q/k/v carry biases: the merged folder keeps them.
    export_run(run, "merged", tmp_path / "m", opts())
    assert rel(model_logits(reload(tmp_path / "m"), ids), reference) < TOL
    # The tokenizer files are the base folder's, byte for byte.
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (Path(base) / "tokenizer.json").read_bytes()
    assert check_path(tmp_path / "a") == [] and check_path(tmp_path / "m") == []


# ------------------------------------------------------------------------------- --check


@pytest.fixture(scope="module")
def good_export(loaded, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "x"
    export_run(loaded["lora"], "anchored", out, opts())
    return out


def _adapter_copy(good: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(good / "adapter", folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)


_DROP = object()
_FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

CHECK_CASES = {
    "missing r": (lambda f: _edit_config(f, r=_DROP), "missing required key 'r'"),
    "use_dora": (lambda f: _edit_config(f, use_dora=True), "use_dora"),
    "modules_to_save": (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda f: _edit_config(f, bias="all"), "bias 'all'"),
    "rank not allowed": (lambda f: _edit_config(f, r=12, lora_alpha=12), "r=12 is not an allowed"),
    "adapter name in keys": (
        lambda f: _edit_weights(f, lambda w: {k.replace(".weight", ".default.weight"): v
                                              for k, v in w.items()}),
        "unsupported LoRA weight",
    ),
    "wrong prefix": (
        lambda f: _edit_weights(f, lambda w: {k.replace("model.model.", "model."): v for k, v in w.items()}),
        "never applies it (wrong prefix)",
    ),
    "shape mismatch": (
        lambda f: _edit_weights(f, lambda w: {**w, _FIRST_A: w[_FIRST_A][:, :-1].contiguous()}),
        "shape mismatch",
    ),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_flags_each_broken_adapter(good_export: Path, tmp_path: Path, case: str) -> None:
    folder = _adapter_copy(good_export, tmp_path)
    assert check_path(folder) == []
    breaks, expected = CHECK_CASES[case]
    breaks(folder)
    problems = check_path(folder)
    assert any(expected in p for p in problems), problems
    if case == "wrong prefix":
        assert any("did you mean 'model.layers." in p for p in problems)
        assert len(problems) == 1  # one line for all modules, not one per layer


def test_check_flags_a_stray_safetensors_in_a_model_folder(good_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(good_export / "model", folder)
    assert check_path(folder) == []
    adapter_file = "adapter_model.safetensors"
    shutil.copyfile(good_export / "adapter" / adapter_file, folder / adapter_file)
    problems = check_path(folder)
    assert any("stray safetensors" in p for p in problems), problems
    (folder / "adapter_model.safetensors").rename(folder / "extra.safetensors")
    assert any("stray safetensors" in p for p in check_path(folder))


def test_check_flags_leftover_quantization_config_and_wrong_eos(good_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(good_export / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = 7
    (folder / "generation_config.json").write_text(json.dumps(generation))
    problems = check_path(folder)
    assert any("quantization_config" in p for p in problems)
    assert any("does not include the tokenizer's EOS" in p for p in problems)


# ----------------------------------------------------------------------------------- CLI


def test_cli_export_merge_and_check(run_dirs, tmp_path: Path) -> None:
    runner = CliRunner()
    run = str(run_dirs["peso-t"])
    out = tmp_path / "x"
    result = runner.invoke(main, ["export", run, "--format", "anchored", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vllm serve" in result.output and "relative error" in result.output
    again = runner.invoke(main, ["export", run, "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output and "Traceback" not in again.output
    checked = runner.invoke(main, ["export", "--check", str(out)])
    assert checked.exit_code == 0 and "ok:" in checked.output
    _edit_config(out / "adapter", use_dora=True)
    failed = runner.invoke(main, ["export", "--check", str(out)])
    assert failed.exit_code == 1 and "use_dora" in failed.output
    merged = runner.invoke(main, ["merge", run, "--out", str(tmp_path / "w"), "--include-adapter",
                                  "--no-verify"])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "w" / "model.safetensors.index.json").is_file()


def test_cli_usage_errors_are_one_line(run_dirs, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["export"]).exit_code == 2
    assert runner.invoke(main, ["export", str(run_dirs["lora"])]).exit_code == 2  # no --out
    missing = runner.invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and missing.output.startswith("error: run folder")
    assert "Traceback" not in missing.output


@pytest.mark.parametrize("command", ["export", "merge"])
def test_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--out" in result.output and "--dtype" in result.output


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Only q/v/up adapted: k/o/gate/down stay bitsandbytes layers and must be written dequantised.
    return _train(tmp_path_factory.mktemp("nf4"), "nf4", **{
        "model.quant": "nf4", "method.name": "peso-r", "method.restart_every": 4,
        "method.target_modules": ["q_proj", "v_proj", "up_proj"]})


def test_nf4_run_merges_and_exports_and_reports_the_dequantisation_difference(nf4_run: Path,
                                                                             tmp_path: Path) -> None:
    from pesocli.export import FORMATS

    run = load_run(nf4_run)
    assert type(run.model.model.layers[0].self_attn.k_proj.weight).__name__ == "Params4bit"
    original = load_run(nf4_run, quant="none")
    ids = tokens()
    trained, on_original = model_logits(run.model, ids), model_logits(original.model, ids)
    assert rel(on_original, trained) > 10 * TOL  # the two W0 really differ

    lines: list[str] = []
    merge_run(run, tmp_path / "w", include_adapter=True, options=opts(), say=lines.append)
    assert rel(model_logits(reload(tmp_path / "w"), ids), trained) < TOL  # default: reproduces training
    assert any(line.startswith("nf4 run: W0 = the dequantised") for line in lines)
    quantised = json.loads((tmp_path / "w" / "peso_export.json").read_text())["quantised_base"]
    assert quantised["quant"] == "nf4" and quantised["base_weights"] == "dequantised"
    assert quantised["original_vs_dequantised_logits"] > 10 * TOL
    assert "quantization_config" not in json.loads((tmp_path / "w" / "config.json").read_text())
    assert check_path(tmp_path / "w") == []

    merge_run(run, tmp_path / "o", include_adapter=True, options=opts(base_weights="original"))
    assert rel(model_logits(reload(tmp_path / "o"), ids), on_original) < TOL

    for fmt in FORMATS:
        out = export_run(run, fmt, tmp_path / fmt, opts()).out
        parts = json.loads((out / "peso_export.json").read_text())["parts"]
        model = (reload(out / parts["adapter_base"], out / parts["adapter"]) if "adapter" in parts
                 else reload(out / parts["model"]))
        assert rel(model_logits(model, ids), trained) < TOL, fmt
        assert check_path(out) == []


@pytest.mark.slow
def test_dense_anchor_exports_exactly(tmp_path: Path) -> None:
    run = load_run(_train(tmp_path, "dense", **{"method.name": "peso-r", "method.restart_every": 4,
                                                "method.anchor_mode": "dense"}))
    ids = tokens()
    reference = model_logits(run.model, ids)
    export_run(run, "adapter", tmp_path / "a", opts(max_rank=512))
    export_run(run, "merged", tmp_path / "m", opts())
    assert rel(model_logits(reload(tmp_path / "a" / "base", tmp_path / "a"), ids), reference) < TOL
    assert rel(model_logits(reload(tmp_path / "m"), ids), reference) < TOL


def test_cli_merge_says_what_the_folder_is_and_serves_it_with_the_runs_adapter(
    run_dirs, loaded, tmp_path: Path
) -> None:
    """``peso merge RUN`` (no --include-adapter) is ``W0 + anchor``: the CLI and README say it is not the
    trained model, check it against ``W0 + anchor``, and serve it with the run's final adapter, which on
    top of it gives the trained model's logits."""
    run_dir = run_dirs["peso-r"]
    out = tmp_path / "w"
    result = CliRunner().invoke(main, ["merge", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "WITHOUT the final adapter, so it is not the trained model" in text
    assert "vs W0 + anchor (what it should equal" in text and "vs the trained model" not in text
    adapter = run_dir / "export" / "anchored" / "adapter"
    assert f"--enable-lora --lora-modules peso={adapter} --max-lora-rank 8" in text
    readme = (out / "README.md").read_text()
    assert "Written by `peso merge`" in readme and "**not the trained model**" in readme
    assert f"peso={adapter}" in readme and f"peso={adapter}" in (out / "serve.sh").read_text()
    ids = tokens()
    served = model_logits(reload(out, adapter), ids)
    assert rel(served, model_logits(loaded["peso-r"].model, ids)) < TOL

    copy = tmp_path / "run-copy"  # a run without its anchored export: point to --include-adapter
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    result = CliRunner().invoke(main, ["merge", str(copy), "--out", str(tmp_path / "w2"), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "pass --include-adapter" in " ".join(result.output.split())
    full = CliRunner().invoke(main, ["merge", str(copy), "--out", str(tmp_path / "w3"), "--no-verify",
                                     "--include-adapter"])
    assert full.exit_code == 0 and "wrote merged model to" in full.output
    assert "Written by `peso merge`" in (tmp_path / "w3" / "README.md").read_text()


def test_export_and_merge_refuse_an_existing_out_before_loading_anything(
    run_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    cli_export = importlib.import_module("pesocli.cli.export")  # the module, not the command it defines
    cli_merge = importlib.import_module("pesocli.cli.merge")

    def never(*args, **kwargs):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(cli_export, "load", never)
    monkeypatch.setattr(cli_merge, "load", never)
    (tmp_path / "taken").mkdir()
    for command in ("export", "merge"):
        result = CliRunner().invoke(main, [command, str(run_dirs["lora"]), "--out", str(tmp_path / "taken")])
        assert result.exit_code == 1 and "exists; pass --force" in result.output, result.output


def test_anchored_manifest_names_no_base_folder_it_does_not_have(run_dirs) -> None:
    """The train-time anchored export of a tiny run: no ``base/`` folder, and the manifest says none."""
    root = run_dirs["peso-r"] / "export" / "anchored"
    manifest = json.loads((root / "peso_export.json").read_text())
    assert not (root / "base").exists() and "base/" not in manifest["base_model_served"]
