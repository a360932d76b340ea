"""What ``peso eval TARGET`` points at, how to load it, and a hash that names exactly what was measured.

A target is one of:

- ``run``: a run folder of ``peso train`` (``final/`` or ``checkpoints/step-N`` with ``--checkpoint``),
  loaded by :func:`pesocli.runs.load_run` as it was trained (anchors + adapters, unmerged);
- ``model``: a Hugging Face model folder (a ``merged`` export, a plain model), a cached id or alias,
  a ``.gguf`` file or GGUF alias (``smollm2-135m``, loaded dequantised), or ``tiny``;
- ``anchored``: a folder holding ``model/`` (a model folder) and ``adapter/`` (a PEFT LoRA folder),
  as ``peso export --format anchored`` writes it; the adapter is applied unmerged, as vLLM does;
- ``adapter``: a PEFT LoRA folder (``adapter_config.json``) on its base model
  (``base_model_name_or_path``, or ``--base``).

Folders are recognised by what they contain, so every export format (and exports of other tools)
works without reading ``peso_export.json``; when present, its ``format`` is reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.errors import ConfigError, MissingRunError, ModelError, PesoError
from pesocli.hashing import sha256

if TYPE_CHECKING:
    from pesocli.evaluate.config import EvalConfig

EXPORT_META = "peso_export.json"
_RUN_MARKERS = ("config.yaml", "final", "checkpoints", "metrics.jsonl")


@dataclass(frozen=True)
class Target:
    """A resolved eval target (nothing loaded yet)."""

    kind: str
    """``run``, ``model``, ``anchored`` or ``adapter``."""
    spec: str
    """What the user passed."""
    path: Path | None
    """The run / export / model / adapter folder (``None`` for ``tiny``)."""
    model: str | None = None
    """What to load the (base) model from: a folder, a ``.gguf`` file or ``tiny``."""
    adapter_dir: Path | None = None
    """The PEFT LoRA folder applied on top (``anchored``, ``adapter``)."""
    state_dir: Path | None = None
    """The run's state folder (``run``)."""
    checkpoint: int | None = None
    export_format: str | None = None
    """``format`` of ``peso_export.json`` when the folder has one."""

    @property
    def name(self) -> str:
        """A short name for output folders."""
        return self.path.name if self.path is not None else str(self.spec).replace("/", "--")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "path": str(self.path) if self.path else None,
            "model": self.model,
            "adapter": str(self.adapter_dir) if self.adapter_dir else None,
            "state": str(self.state_dir) if self.state_dir else None,
            "checkpoint": self.checkpoint,
            "export_format": self.export_format,
        }


def _export_format(folder: Path) -> str | None:
    meta = folder / EXPORT_META
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value is not None else None


def resolve_target(spec: str, checkpoint: int | None = None, base: str | None = None) -> Target:
    """Recognise ``spec`` (see the module docstring). Raises a one-line :class:`PesoError` when it is
    an empty folder, a folder of nothing peso can evaluate, a run with no final state, or a model
    name that is not on this machine."""
    from pesocli.models import resolve_model

    folder = Path(spec).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        if any((folder / marker).exists() for marker in _RUN_MARKERS):
            from pesocli.runs import state_folder

            return Target(
                "run",
                spec,
                folder,
                state_dir=state_folder(folder, checkpoint).resolve(),
                checkpoint=checkpoint,
            )
        if checkpoint is not None:
            raise ConfigError(f"--checkpoint applies to run folders; {folder} is not one")
        fmt = _export_format(folder)
        if (folder / "config.json").is_file():
            return Target("model", spec, folder, model=str(folder), export_format=fmt)
        if (folder / "adapter_config.json").is_file():
            model = resolve_model(base or _adapter_base(folder)).spec  # one line when it is not here
            return Target("adapter", spec, folder, model=model, adapter_dir=folder, export_format=fmt)
        if (folder / "model" / "config.json").is_file():
            adapter = folder / "adapter"
            if (adapter / "adapter_config.json").is_file():
                return Target(
                    "anchored",
                    spec,
                    folder,
                    model=str(folder / "model"),
                    adapter_dir=adapter,
                    export_format=fmt,
                )
            return Target("model", spec, folder, model=str(folder / "model"), export_format=fmt)
        what = "is empty" if not any(folder.iterdir()) else "holds nothing peso can evaluate"
        raise ModelError(
            f"{folder} {what}: expected a run folder (config.yaml, final/), an export (model/, adapter/), "
            "a model folder (config.json) or a PEFT adapter folder (adapter_config.json)"
        )
    if _names_a_local_path(spec):
        raise MissingRunError(f"run or model folder {spec} does not exist (nothing at {folder.absolute()})")
    if checkpoint is not None:
        raise ConfigError(f"--checkpoint applies to run folders; {spec!r} is not one")
    resolved = resolve_model(spec)  # ModelError (one line) when it is not on this machine
    return Target("model", spec, resolved.path, model=resolved.spec)


def _names_a_local_path(spec: str) -> bool:
    """Whether ``spec``, which is not a folder, was meant as one (``runs/nope`` when ``runs/`` exists,
    ``./x``, ``/x``, ``~/x``, ``x/``), not as a model id or alias: then "no such folder" is the answer,
    not the Hugging Face cache's. ``.gguf`` files are left to the model resolver."""
    from pesocli.gguf_models import is_gguf_path

    path = Path(spec).expanduser()
    if path.exists() or is_gguf_path(spec):
        return False
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", "\\")):
        return True
    return len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def _adapter_base(folder: Path) -> str:
    """``base_model_name_or_path`` of an adapter folder; a relative path is taken from the folder."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'adapter_config.json'}: not readable JSON ({exc})") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise ModelError(
            f"{folder / 'adapter_config.json'} names no base_model_name_or_path; pass --base MODEL"
        )
    relative = folder / base
    return str(relative.resolve()) if not Path(base).is_absolute() and relative.is_dir() else str(base)


# ------------------------------------------------------------------------------------------------
# Hash: what exactly was evaluated.


def _folder_entries(folder: Path, prefix: str) -> list[str]:
    """``prefix/relative-path:sha256`` for every file of ``folder``.

    Files of a Hugging Face cache snapshot are links to blobs named by their content hash, so the
    blob name is used instead of reading multi-GB weights again.
    """
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() and path.resolve().parent.name == "blobs":
            entries.append(f"{prefix}/{relative}:{path.resolve().name}")
        else:
            entries.append(f"{prefix}/{relative}:{sha256(path)}")
    return entries


def target_hash(target: Target) -> str:
    """``sha256:<hex>`` over the files that define the evaluated weights.

    Runs: ``config.yaml`` and the state folder's ``manifest.json`` (which holds the sha256 of every
    tensor file). Folders: every file of the model and adapter folders. ``tiny``: its name and the
    peso version that builds it.
    """
    from pesocli import __version__

    entries: list[str] = []
    if target.kind == "run":
        assert target.path is not None and target.state_dir is not None
        for path in (target.path / "config.yaml", target.state_dir / "manifest.json"):
            if path.is_file():
                entries.append(f"{path.name}:{sha256(path)}")
    else:
        model = Path(target.model) if target.model else None
        if model is not None and model.is_dir():
            entries += _folder_entries(model, "model")
        elif model is not None and model.is_file():  # a .gguf file
            entries.append(f"model/{model.name}:{sha256(model)}")
        else:
            entries.append(f"model:{target.model}:peso-{__version__}")
        if target.adapter_dir is not None:
            entries += _folder_entries(target.adapter_dir, "adapter")
    return "sha256:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Loading for the hf backend.


@dataclass
class LoadedTarget:
    """A target in memory: a causal LM (eval mode) and its tokenizer."""

    model: Any
    tokenizer: Any
    step: int | None = None
    """Optimizer steps of a run's state."""
    template: str | None = None
    """The run's prompt template (``data.template``) for run targets."""


def load_target(target: Target, cfg: EvalConfig) -> LoadedTarget:
    """Load ``target`` for the hf backend on ``cfg.device`` (runs in their training dtype)."""
    from pesocli.config import ModelConfig
    from pesocli.models import load_model_and_tokenizer, resolve_device

    device = resolve_device(cfg.device)
    if target.kind == "run":
        from pesocli.runs import load_run

        assert target.path is not None
        run = load_run(target.path, target.checkpoint, device=str(device))
        return LoadedTarget(run.model, run.tokenizer, step=run.step, template=run.cfg.data.template)
    assert target.model is not None
    model_cfg = ModelConfig(name=target.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    model, tokenizer = load_model_and_tokenizer(model_cfg, device)
    if target.adapter_dir is not None:
        model = _apply_adapter(model, target.adapter_dir)
        if (target.adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(target.adapter_dir), local_files_only=True)
            if tokenizer.pad_token is None:  # the same rule as pesocli.models: pad with EOS
                tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedTarget(model, tokenizer)


def _apply_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap ``model`` with the PEFT LoRA of ``adapter_dir`` (unmerged, as vLLM applies it)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PesoError(f"cannot apply the adapter {adapter_dir} to its base: {first}") from exc
