"""The three export formats and ``peso merge``: what goes where, in which order.

=============  ===================================================================================
``anchored``   ``OUT/model/`` = ``W~ = W0 + anchor`` (model folder) and ``OUT/adapter/`` = the final
               adapter (PEFT LoRA), next to it, never inside. ``vllm serve OUT/model --enable-lora
               --lora-modules NAME=OUT/adapter``.
``adapter``    ``OUT/`` = one PEFT LoRA on the untouched base, anchor and adapter stacked (rank
               ``R + r``, exact; compressed only past ``--max-rank``). A base that exists only in
               memory (``tiny``, or one dequantised from a ``.gguf`` file) is written to
               ``OUT/base/``. ``vllm serve BASE --enable-lora --lora-modules NAME=OUT``.
``merged``     ``OUT/`` = one dense model folder ``W0 + anchor + Delta W``. ``vllm serve OUT``.
``merge``      ``OUT/`` = ``W0 + anchor`` (``+ Delta W`` with ``include_adapter``), a model folder.
=============  ===================================================================================

Every export is built in a temporary sibling folder, reloaded from there with ``transformers``
(+ ``peft``) and compared with the trained model's logits, given a ``README.md``, ``serve.sh``
and ``peso_export.json``, checked against the vLLM rules, and only then renamed to ``OUT``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pesocli.errors import PesoError
from pesocli.export import verify
from pesocli.export.atomic import atomic_folder
from pesocli.export.check import check_path
from pesocli.export.compress import ALLOWED_RANKS, RankFit, fit_rank
from pesocli.export.convert import (
    anchor_pair,
    layer_pairs,
    merged_weight,
    peft_state_dict,
    stack,
    target_modules,
    write_adapter_config,
)
from pesocli.export.manifest import write_manifest
from pesocli.export.model_folder import (
    DTYPE_NAMES,
    MAX_SHARD_BYTES,
    export_dtype,
    tensor_sources,
    write_model_folder,
)
from pesocli.export.readme import ServeSpec, write_readme
from pesocli.inspect.runlog import restart_step
from pesocli.layers import base_weight
from pesocli.runs import LoadedRun

FORMATS: tuple[str, ...] = ("anchored", "adapter", "merged")
"""``peso export --format`` values."""

BASE_WEIGHTS: tuple[str, ...] = ("dequantised", "original")
"""``--base-weights`` values (runs on quantised backbones only)."""

Say = Callable[[str], None]


@dataclass(kw_only=True)
class ExportOptions:
    """How an export is written (the ``peso export`` / ``peso merge`` options)."""

    dtype: str = "auto"
    """``auto`` (the backbone's dtype), ``bf16``, ``fp16`` or ``fp32``."""
    max_rank: int = ALLOWED_RANKS[-1]
    """Largest adapter rank to write; a wider stack is cut by truncated SVD to an allowed rank."""
    max_error: float = 0.01
    """Refuse a compressed adapter whose relative Frobenius error in some layer passes this."""
    allow_lossy: bool = False
    """Write a compressed adapter even past ``max_error``."""
    adapter_name: str = "peso"
    """The LoRA's name in ``--lora-modules NAME=PATH`` and ``LoRARequest``."""
    force: bool = False
    """Replace an existing output folder."""
    check: bool = True
    """Run the vLLM checker on the result before it is moved into place."""
    verify: bool = True
    """Reload what was written and compare its logits with the trained model's."""
    max_shard_bytes: int = MAX_SHARD_BYTES
    """Size of each model safetensors shard."""
    base_weights: str = "dequantised"
    """For a run on a quantised backbone, the ``W0`` written: ``dequantised`` (the base the run
    trained on; reproduces training) or ``original`` (the full-precision weights it was quantised
    from). The logits difference between the two is reported either way."""


@dataclass
class ExportResult:
    """What an export wrote and measured."""

    format: str
    out: Path
    serve: ServeSpec
    manifest: dict[str, Any]
    logits_error: dict[str, float] = field(default_factory=dict)
    """Relative logits error of each reloaded part against the trained model (``verify``)."""
    fit: RankFit | None = None


def export_run(run: LoadedRun, fmt: str, out: str | Path, options: ExportOptions | None = None,
               say: Say | None = None) -> ExportResult:
    """Write ``run`` as ``fmt`` (``anchored``, ``adapter`` or ``merged``) to ``out``."""
    if fmt not in FORMATS:
        raise PesoError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _Exporter(run, Path(out), options or ExportOptions(), say or (lambda _: None)).run(fmt)


def merge_run(run: LoadedRun, out: str | Path, *, include_adapter: bool = False,
              options: ExportOptions | None = None, say: Say | None = None) -> ExportResult:
    """Write ``W~ = W0 + anchor`` (``+ Delta W`` with ``include_adapter``) as one model folder."""
    exporter = _Exporter(run, Path(out), options or ExportOptions(), say or (lambda _: None))
    return exporter.run("merge-full" if include_adapter else "merge")


class _Exporter:
    def __init__(self, run: LoadedRun, out: Path, options: ExportOptions, say: Say) -> None:
        if options.base_weights not in BASE_WEIGHTS:
            raise PesoError(f"base weights must be one of {', '.join(BASE_WEIGHTS)} "
                            f"(got {options.base_weights!r})")
        self.out = out.expanduser().resolve()
        self.options = options
        self.say = say
        self.dtype = export_dtype(options.dtype, run.model)
        self.tokens = verify.probe_tokens(run.model.get_input_embeddings().num_embeddings)
        self.base = _base_model(run)
        self.quant: dict[str, Any] = {}
        _refuse_overlap(self.out, run)
        self._use(run)

    def _use(self, run: LoadedRun) -> None:
        """Write from ``run`` (the trained run, or the same run on the original base weights)."""
        self.run_ = run
        self.layers = run.engine.layers
        self.method = run.engine.method

    def _choose_base_weights(self, fmt: str) -> None:
        """For a quantised run: measure dequantised vs original ``W0`` on the logits and pick one.

        The adapter format on a base that is a folder or cached id keeps that base untouched, so
        its ``W0`` is the original weights whatever ``base_weights`` says.
        """
        trained = self.run_
        quant = trained.cfg.model.quant
        if quant == "none":
            return
        from pesocli.runs import load_run

        device = next(trained.model.parameters()).device
        original = load_run(trained.run_dir, trained.checkpoint, device=str(device), quant="none")
        difference = verify.relative_error(verify.logits(original.model, self.tokens),
                                           verify.logits(trained.model, self.tokens))
        forced = fmt == "adapter" and not self.base.ships
        choice = "original" if forced else self.options.base_weights
        self.quant = {"quant": quant, "base_weights": choice, "original_vs_dequantised_logits": difference}
        what = {"dequantised": f"the dequantised {quant} base the run trained on (reproduces training)",
                "original": "the original full-precision weights"}[choice]
        self.say(f"{quant} run: W0 = {what}"
                 + (" (the adapter format leaves the base untouched)" if forced else ""))
        self.say(f"original vs dequantised W0 changes the trained model's logits by {difference:.2e} "
                 "(relative)")
        if choice == "original":
            self._use(original)
        else:
            del original

    # ---------------------------------------------------------------------------------- steps

    def run(self, kind: str) -> ExportResult:
        plan = {
            "anchored": self._anchored,
            "adapter": self._adapter,
            "merged": lambda tmp: self._model_only(tmp, adapter=True),
            "merge": lambda tmp: self._model_only(tmp, adapter=False),
            "merge-full": lambda tmp: self._model_only(tmp, adapter=True),
        }[kind]
        fmt = "merged" if kind.startswith("merge") else kind
        self.includes_adapter = kind != "merge"
        self._choose_base_weights(fmt)
        fit = self._fit(fmt) if fmt in ("anchored", "adapter") else None
        needed = self._estimate_bytes(fmt, fit)
        with atomic_folder(self.out, force=self.options.force, needed_bytes=needed) as tmp:
            parts, serve, reference = plan(tmp) if fit is None else plan(tmp, fit)
            errors = self._verify(tmp, parts, reference) if self.options.verify else {}
            info = self._manifest_info(kind, fmt, parts, serve, fit, errors)
            write_readme(tmp, self.out, serve, self._readme_values(kind, fmt, parts, fit, errors,
                                                                   serve.lora_path is not None))
            manifest = write_manifest(tmp, info)
            if self.options.check:
                problems = check_path(tmp)
                if problems:
                    raise PesoError("the export fails its own vLLM check (nothing was written):\n"
                                    + "\n".join(f"  {p}" for p in problems))
        if kind == "merge":
            self.say(f"wrote W~ = W0 + anchor to {self.out}: the base with the restart history folded in, "
                     "WITHOUT the final adapter, so it is not the trained model")
            if serve.lora_path is not None:
                self.say(f"serve the trained model (this folder + the run's final adapter): "
                         f"{serve.command()}")
            else:
                self.say(f"the run has no exported final adapter of step {self.run_.step}: for the trained "
                         f"model pass --include-adapter (one dense folder), or write the adapter with "
                         f"peso export {self.run_.run_dir} --format anchored; this folder alone: "
                         f"{serve.command()}")
        else:
            self.say(f"wrote {'merged model' if kind == 'merge-full' else fmt + ' export'} to {self.out}")
            self.say(f"serve: {serve.command()}")
        return ExportResult(fmt, self.out, serve, manifest, errors, fit)

    def _adapter_only(self) -> bool:
        """``anchored`` with an empty anchor (plain ``lora``, or no restart yet) on a base that has a folder
        or id: ``W0 + anchor`` is the base itself, so the adapter points at it instead of a full copy.

        Not for a base that exists only in memory (tiny, GGUF) or a quantised run (its ``W0`` choice)."""
        return (not self.base.ships and self.run_.cfg.model.quant == "none"
                and all(layer.anchor.rank == 0 for layer in self.layers.values()))

    def _anchored(self, tmp: Path, fit: RankFit):
        if self._adapter_only():
            base_name = self.base.serve_name
            self._write_adapter(tmp / "adapter", fit, base=base_name)
            serve = ServeSpec(base_name, DTYPE_NAMES[self.dtype], self.options.adapter_name,
                              self.out / "adapter", fit.rank)
            parts = {"adapter": "adapter", "adapter_base_external": base_name}
            return parts, serve, self._reference(anchor_only=False)
        self._write_model(tmp / "model", adapter=False)
        self._write_adapter(tmp / "adapter", fit, base=self.out / "model")
        serve = ServeSpec(str(self.out / "model"), DTYPE_NAMES[self.dtype], self.options.adapter_name,
                          self.out / "adapter", fit.rank)
        parts = {"model": "model", "adapter": "adapter", "adapter_base": "model"}
        return parts, serve, self._reference(anchor_only=False)

    def _adapter(self, tmp: Path, fit: RankFit):
        parts: dict[str, str] = {"adapter": "."}
        if self.base.ships:  # tiny, or dequantised from a GGUF file: no folder to point at, ship it
            self._write_model(tmp / "base", adapter=False, anchor=False)
            base_name = str(self.out / "base")
            parts.update(model="base", adapter_base="base")
        else:
            base_name = self.base.serve_name
            parts["adapter_base_external"] = base_name
        self._write_adapter(tmp, fit, base=base_name)
        serve = ServeSpec(base_name, DTYPE_NAMES[self.dtype], self.options.adapter_name, self.out, fit.rank)
        return parts, serve, self._reference(anchor_only=False)

    def _model_only(self, tmp: Path, *, adapter: bool):
        self._write_model(tmp, adapter=adapter)
        serve = ServeSpec(str(self.out), DTYPE_NAMES[self.dtype])
        if not adapter:
            # W0 + anchor alone is not the trained model: serve it with the run's final adapter
            found = run_adapter(self.run_)
            if found is not None:
                serve = ServeSpec(str(self.out), DTYPE_NAMES[self.dtype], self.options.adapter_name, *found)
        return {"model": "."}, serve, self._reference(anchor_only=not adapter)

    # ------------------------------------------------------------------------------- writers

    def _write_model(self, folder: Path, *, adapter: bool, anchor: bool = True) -> None:
        def weight(name: str, layer) -> torch.Tensor:
            if not anchor:
                return base_weight(layer.base)
            return merged_weight(layer, self.method, adapter=adapter)

        sources = tensor_sources(self.run_.model, self.layers, weight)
        write_model_folder(folder, self.run_.model, self.run_.tokenizer, sources, self.dtype,
                           self.base.path, self.options.max_shard_bytes)

    def _write_adapter(self, folder: Path, fit: RankFit, *, base: str | Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        for name, pair in fit.pairs.items():
            if not (torch.isfinite(pair.lora_A).all() and torch.isfinite(pair.lora_B).all()):
                raise PesoError(f"layer {name} has non-finite adapter values; refusing to export")
        save_file(peft_state_dict(fit.pairs, self.dtype), folder / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        targets = target_modules(self.run_.model, list(self.layers))
        write_adapter_config(folder, rank=fit.rank, targets=targets, base=str(base))

    # ------------------------------------------------------------------------------- ranks

    def _fit(self, fmt: str) -> RankFit:
        """The adapter (``anchored``) or the anchor + adapter stack (``adapter``) at one allowed rank.

        Exact (zero padding) unless wider than ``max_rank``; then each layer's truncation error and
        the resulting logits error are reported, and past ``max_error`` the export is refused.
        """
        pairs = layer_pairs(self.layers, self.method, anchor=(fmt == "adapter"), adapter=True)
        fit = fit_rank(pairs, self.options.max_rank)
        if not fit.lossy:
            return fit
        what = "the final adapter" if fmt == "anchored" else "anchor + adapter stacked"
        self.say(f"{what} has rank {fit.exact_rank}, above --max-rank {self.options.max_rank}: "
                 f"truncated SVD to rank {fit.rank}; relative Frobenius error per layer:")
        for name, error in fit.errors.items():
            self.say(f"  {name}: {error:.2e}")
        served = {name: stack(anchor_pair(layer), fit.pairs[name]) if fmt == "anchored" else fit.pairs[name]
                  for name, layer in self.layers.items()}
        approx = verify.adapter_logits(self.run_.model, self.layers, served, self.tokens)
        logits_error = verify.relative_error(approx, verify.logits(self.run_.model, self.tokens))
        self.say(f"logits relative error of the compressed adapter (in memory): {logits_error:.2e}")
        if fit.max_error > self.options.max_error and not self.options.allow_lossy:
            worst = max(fit.errors, key=fit.errors.__getitem__)
            raise PesoError(
                f"compressing to rank {fit.rank} loses up to {fit.max_error:.1%} of a layer's update "
                f"({worst}), "
                f"above --max-error {self.options.max_error:g}; raise --max-rank (exact needs "
                f"{fit.exact_rank}), or pass --allow-lossy"
            )
        return fit

    # --------------------------------------------------------------------------- fidelity

    def _reference(self, *, anchor_only: bool) -> torch.Tensor:
        """Logits the export must reproduce: the trained model, or ``W0 + anchor`` for a plain merge."""
        if not anchor_only:
            return verify.logits(self.run_.model, self.tokens)
        pairs = {name: anchor_pair(layer) for name, layer in self.layers.items()}
        return verify.adapter_logits(self.run_.model, self.layers, pairs, self.tokens)

    def _verify(self, tmp: Path, parts: dict[str, str], reference: torch.Tensor) -> dict[str, float]:
        device = next(self.run_.model.parameters()).device
        try:
            if "adapter" in parts:
                base = (tmp / parts["adapter_base"] if "adapter_base" in parts
                        else parts["adapter_base_external"])
                reloaded = verify.load_with_adapter(base, tmp / parts["adapter"], device)
                label = "model + adapter" if parts.get("adapter_base") == "model" else "base + adapter"
            else:
                reloaded = verify.load_model_folder(tmp / parts["model"], device)
                label = "model"
            error = verify.relative_error(verify.logits(reloaded, self.tokens), reference)
            del reloaded
        except Exception as exc:  # noqa: BLE001 - a failed reload is reported, the check still gates
            self.say(f"warning: could not reload the export to compare logits: {str(exc).splitlines()[0]}")
            return {}
        original = self.quant.get("base_weights") == "original"
        against = "the trained adapters on the original base" if original else "the trained model"
        if "adapter" not in parts and not self.includes_adapter:
            against = "W0 + anchor (what it should equal: the trained model without its final adapter)"
        self.say(f"logits of the reloaded export ({label}, {DTYPE_NAMES[self.dtype]}) vs {against}: "
                 f"relative error {error:.2e}")
        return {label: error}

    # ----------------------------------------------------------------------- bookkeeping

    def _estimate_bytes(self, fmt: str, fit: RankFit | None) -> int:
        """Bytes the output will take (model folder tensors at their written shapes + adapter)."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        sources = tensor_sources(self.run_.model, self.layers, lambda name, layer: None)
        model_bytes = sum(math.prod(source.shape) for source in sources) * itemsize
        adapter_bytes = 0 if fit is None else sum(
            (p.lora_A.numel() + p.lora_B.numel()) * itemsize for p in fit.pairs.values())
        in_place = (fmt == "adapter" and not self.base.ships) or (fmt == "anchored" and self._adapter_only())
        copies = 0 if in_place else 1
        return model_bytes * copies + adapter_bytes

    def _manifest_info(self, kind: str, fmt: str, parts: dict[str, str], serve: ServeSpec,
                       fit: RankFit | None, errors: dict[str, float]) -> dict[str, Any]:
        run = self.run_
        anchor_ranks = [layer.anchor.rank for layer in self.layers.values()]
        info: dict[str, Any] = {
            "format": fmt,
            "command": "merge" if kind.startswith("merge") else "export",
            "includes": _includes(kind),
            "method": run.method_name,
            "source": {
                "run": str(run.run_dir),
                "state": str(run.state_dir),
                "step": run.step,
                "checkpoint": run.checkpoint,
            },
            "base_model": run.cfg.model.name,
            "base_model_served": (self.base.serve_name
                                  or self.base.describe(written=parts.get("model") == "base")),
            "dtype": DTYPE_NAMES[self.dtype],
            "ranks": {
                "method_rank": run.cfg.method.rank,
                "anchor_rank_max": max(anchor_ranks, default=0),
                "anchor_rank_min": min(anchor_ranks, default=0),
            },
            "restarts": _restarts(run),
            "parts": parts,
            "serve_command": serve.command(),
            "logits_relative_error": errors,
        }
        if self.quant:
            info["quantised_base"] = self.quant
        if self.base.gguf is not None:
            from pesocli.hashing import sha256

            info["base_dequantised_from"] = {
                "gguf_file": str(self.base.gguf),
                "sha256": sha256(self.base.gguf),
                "dtype": DTYPE_NAMES[export_dtype("auto", run.model)],
            }
        if fit is not None:
            info["ranks"].update(exact_rank=fit.exact_rank, adapter_r=fit.rank, lossy=fit.lossy,
                                 max_layer_error=fit.max_error)
            if fit.lossy:
                info["layer_errors"] = fit.errors
        return info

    def _readme_values(self, kind: str, fmt: str, parts: dict[str, str], fit: RankFit | None,
                       errors: dict[str, float], serve_has_adapter: bool = False) -> dict[str, Any]:
        run = self.run_
        out = self.out
        if fmt == "anchored" and "model" not in parts:
            title = "peso export: anchored (empty anchor: the adapter on the untouched base)"
            layout = (f"- `{out / 'adapter'}`: the final adapter as a PEFT LoRA (rank {fit.rank}, exact rank "
                      f"{fit.exact_rank}) on the base `{self.base.serve_name}`, untouched.\n\nThe anchor is "
                      "empty (no restart absorbed anything), so `W~ = W0 + anchor` is the base itself and "
                      "no copy of it was written.")
            notes = f"`--max-lora-rank {fit.rank}` is the adapter's rank (one of vLLM's allowed values)."
        elif fmt == "anchored":
            title = "peso export: anchored model + adapter"
            layout = (f"- `{out / 'model'}`: the model folder with `W~ = W0 + anchor` (the base plus the "
                      f"absorbed restart history).\n- `{out / 'adapter'}`: the final adapter as a PEFT LoRA "
                      f"(rank {fit.rank}, exact rank {fit.exact_rank}).")
            notes = f"`--max-lora-rank {fit.rank}` is the adapter's rank (one of vLLM's allowed values)."
        elif fmt == "adapter":
            title = "peso export: one LoRA adapter on the untouched base"
            base_line = (f"- `{out / 'base'}`: {self.base.describe(written=False)}, as a model folder."
                         if "model" in parts else f"- base model: `{self.base.serve_name}` (untouched).")
            layout = (f"- `{out}`: one PEFT LoRA stacking the anchor and the final adapter (exact rank "
                      f"{fit.exact_rank}, written as rank {fit.rank}).\n{base_line}")
            notes = (f"`--max-lora-rank {fit.rank}` is the adapter's rank (one of vLLM's allowed values)." +
                     (f" Compressed by truncated SVD: largest per-layer relative Frobenius error "
                      f"{fit.max_error:.2e}." if fit.lossy else " Exact (no compression)."))
        else:
            what = {"merge": "`W~ = W0 + anchor` (without the final adapter)",
                    "merge-full": "`W0 + anchor + Delta W` (anchor and final adapter folded in)",
                    "merged": "`W0 + anchor + Delta W` (anchor and final adapter folded in)"}[kind]
            title = ("peso merge: one model folder" if kind.startswith("merge")
                     else "peso export: merged model")
            layout = f"- `{out}`: one dense model folder holding {what}."
            notes = "No LoRA: serve it like any model."
            if kind == "merge":
                layout += ("\n\nThis is **not the trained model**: the final adapter (rank "
                           f"{run.cfg.method.rank}) is left out. Serve it with that adapter (below), "
                           "merge with `--include-adapter` for one dense folder of the trained model, or "
                           "continue training from it.")
                notes = ("The command above adds the run's final adapter (from its anchored export of "
                         "the same step)." if serve_has_adapter else
                         f"The command above serves `W0 + anchor` alone. For the trained model, write the "
                         f"final adapter with `peso export {run.run_dir} --format anchored` and add it "
                         "with `--enable-lora --lora-modules`, or merge with `--include-adapter`.")
        if self.base.gguf is not None:
            notes += (f"\n\n`W0` is the base dequantised from `{self.base.gguf}` (the weights the run "
                      "trained on), written as plain safetensors: no GGUF reader is needed to serve it.")
        if self.quant:
            q = self.quant
            notes += (f"\n\nThe run trained on a {q['quant']} (bitsandbytes) base. `W0` here is "
                      + ("the dequantised base it trained on" if q["base_weights"] == "dequantised"
                         else "the original full-precision weights")
                      + f"; the other choice changes the trained model's logits by "
                      f"{q['original_vs_dequantised_logits']:.2e} (relative, `--base-weights`).")
            if fmt == "adapter" and "model" not in parts:
                notes += (" vLLM's `--quantization bitsandbytes` quantises the base at load time, "
                          "closer to what the run trained on (not verified by peso).")
        if errors:
            rows = "\n".join(f"| {label} | {value:.2e} |" for label, value in errors.items())
            against = "`W0 + anchor` computed from the run" if kind == "merge" else "the trained model"
            fidelity = ("Logits of this export reloaded with `transformers`" + (" + `peft`" if fit else "") +
                        f" against {against} on a fixed probe batch "
                        "(`max |diff| / max |reference|`):\n\n"
                        "| reloaded | relative error |\n|---|---|\n" + rows)
        else:
            fidelity = "Not measured (exported with `--no-verify`)."
        return {
            "title": title,
            "command": "peso merge" if kind.startswith("merge") else "peso export",
            "peso_version": _version(),
            "run_dir": run.run_dir,
            "state_name": run.state_dir.name,
            "step": run.step,
            "method": run.method_name,
            "base_model": run.cfg.model.name,
            "dtype": DTYPE_NAMES[self.dtype],
            "layout": layout,
            "serve_notes": notes,
            "fidelity": fidelity,
            "format": fmt,
        }


@dataclass
class _Base:
    """The untouched base model: where its files are and what ``vllm serve`` should be given."""

    path: Path | None
    """Its folder, whose tokenizer files are copied verbatim; ``None`` when the base exists only in
    memory (the tiny model, a GGUF file): the tokenizer in memory is saved instead."""
    serve_name: str | None
    """Absolute folder or Hugging Face id for ``vllm serve``; ``None`` when the base exists only in memory."""
    gguf: Path | None = None
    """The ``.gguf`` file the base was dequantised from."""

    @property
    def ships(self) -> bool:
        """The ``adapter`` format must write the base itself (to ``OUT/base``): nothing to point vLLM at."""
        return self.serve_name is None

    def describe(self, *, written: bool) -> str:
        """What the base is, for a base without a folder of its own (``written``: it is in ``base/``)."""
        what = (f"the base dequantised from {self.gguf}" if self.gguf is not None
                else "the built-in tiny base model (it exists only in code)")
        return f"{what} (written to base/)" if written else what


def _base_model(run: LoadedRun) -> _Base:
    from pesocli.models import resolve_model

    resolved = resolve_model(run.cfg.model.name, gguf_file=run.cfg.model.gguf_file)
    if resolved.kind == "tiny":
        return _Base(None, None)
    if resolved.kind == "gguf":
        return _Base(None, None, resolved.gguf_path)
    if resolved.kind == "hub_cache":
        return _Base(resolved.path, resolved.repo_id)
    return _Base(resolved.path, str(resolved.path))


def run_adapter(run: LoadedRun) -> tuple[Path, int] | None:
    """The run's final adapter of the loaded state as a PEFT folder, with its rank, if one was exported.

    Looked for in ``RUN/export/anchored/adapter`` (what ``peso train`` writes when it ends), used only
    when its ``peso_export.json`` names the same state folder and step as ``run``.
    """
    root = run.run_dir / "export" / "anchored"
    try:
        manifest = json.loads((root / "peso_export.json").read_text())
        rank = int(json.loads((root / "adapter" / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    source = manifest.get("source") or {}
    same = (Path(str(source.get("state"))).resolve() == run.state_dir.resolve()
            and source.get("step") == run.step)
    return (root / "adapter", rank) if same else None


def _refuse_overlap(out: Path, run: LoadedRun) -> None:
    """``--out`` must not be the run folder, hold it, or sit inside a state folder (``--force`` deletes)."""
    run_dir = run.run_dir.resolve()
    if out == run_dir or run_dir.is_relative_to(out):
        raise PesoError(f"--out {out} would replace the run folder {run_dir}; choose another folder")
    if out.is_relative_to(run.state_dir) or out.is_relative_to(run_dir / "checkpoints"):
        raise PesoError(f"--out {out} is inside the run's state folders; choose another folder")


def _includes(kind: str) -> list[str]:
    return {
        "anchored": ["base", "anchor", "adapter"],
        "adapter": ["anchor", "adapter"],
        "merged": ["base", "anchor", "adapter"],
        "merge": ["base", "anchor"],
        "merge-full": ["base", "anchor", "adapter"],
    }[kind]


def _restarts(run: LoadedRun) -> int:
    """Restart (or subspace) events before the exported step, from the run's ``restarts.jsonl``."""
    path = run.run_dir / "restarts.jsonl"
    if not path.is_file():
        return 0
    steps = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            step = restart_step(record)  # 1-based: the restart ran before this step
            if step <= run.step:
                steps.add(step)
    return len(steps)


def _version() -> str:
    from pesocli import __version__

    return __version__
