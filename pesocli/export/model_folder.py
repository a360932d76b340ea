"""Write a Hugging Face model folder that vLLM and ``from_pretrained`` load as is.

What goes in (``vllm-adapter-rules.md``, "Model folder"): ``config.json`` without any
``quantization_config`` and with the requested dtype; sharded ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json`` (only the real parameter names, so nothing stray loads);
the tokenizer files with a chat template; ``generation_config.json`` whose ``eos_token_id``
includes the EOS the run appended to every training example. Nothing else with a
``.safetensors`` suffix is ever written into a model folder.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pesocli.layers import AdaptedLinear, base_weight

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``--dtype`` values and their torch dtypes."""

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
"""How ``config.json`` (and vLLM's ``--dtype``) spell each dtype."""

MAX_SHARD_BYTES = 4 * 1024**3
"""Shard size of written model folders (transformers' old default; every shard fits in RAM)."""

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied verbatim from a base model folder, so any transformers version reads them as before."""


@dataclass
class TensorSource:
    """One tensor of the folder, produced only when its shard is written."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def export_dtype(name: str, model: torch.nn.Module) -> torch.dtype:
    """``auto`` (the backbone's floating dtype), ``bf16``, ``fp16`` or ``fp32``."""
    if name == "auto":  # a quantised backbone's packed weights are uint8/int8: skipped
        return next((p.dtype for p in model.parameters() if p.dtype in DTYPE_NAMES), torch.float32)
    return DTYPES[name]


def tensor_sources(
    model: torch.nn.Module,
    layers: dict[str, AdaptedLinear],
    layer_weight: Callable[[str, AdaptedLinear], torch.Tensor],
) -> list[TensorSource]:
    """Every tensor of the plain model, in ``state_dict`` order, adapted layers replaced by ``layer_weight``.

    ``<layer>.base.weight`` becomes ``<layer>.weight`` = ``layer_weight(name, layer)`` and
    ``<layer>.base.bias`` becomes ``<layer>.bias``; anchor and delta tensors are dropped. A
    bitsandbytes layer that is not adapted is written dequantised (its packed weight and
    quantisation state are dropped). With tied embeddings the second name of a shared tensor is
    dropped, as ``save_pretrained`` does.
    """
    # owner module -> (its weight key suffix, its bias key suffix, shape, weight maker)
    owners: dict[str, tuple[str, str, tuple[int, int], Callable[[], torch.Tensor]]] = {}
    for name, layer in layers.items():
        owners[name] = ("base.weight", "base.bias", (layer.out_features, layer.in_features),
                        lambda n=name, l=layer: layer_weight(n, l))  # noqa: E741
    for name, module in model.named_modules():
        if is_quantised(module) and not any(name.startswith(f"{a}.") for a in layers):
            owners[name] = ("weight", "bias", (module.out_features, module.in_features),
                            lambda m=module: base_weight(m))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sources, seen = [], set()
    for key, value in model.state_dict(keep_vars=True).items():
        owner = next((n for n in _prefixes(key) if n in owners), None)
        if owner is not None:
            weight_key, bias_key, shape, make = owners[owner]
            rest = key[len(owner) + 1 :]
            if rest == weight_key:
                sources.append(TensorSource(f"{owner}.weight", shape, make))
            elif rest == bias_key:
                sources.append(TensorSource(f"{owner}.bias", tuple(value.shape), lambda v=value: v.detach()))
            continue  # anchor, delta, and bitsandbytes' quantisation state
        pointer = value.data_ptr()
        if tied and pointer in seen:
            continue
        seen.add(pointer)
        sources.append(TensorSource(key, tuple(value.shape), lambda v=value: v.detach()))
    return sources


def is_quantised(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (its weight is ``Params4bit`` / ``Int8Params``)."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def write_weights(folder: Path, sources: list[TensorSource], dtype: torch.dtype,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Sharded safetensors + ``model.safetensors.index.json``; returns the shard file names.

    Floating tensors are cast to ``dtype`` (after being formed in FP32); each tensor is produced
    only when its shard is written, so memory holds one shard at a time.
    """
    from safetensors.torch import save_file

    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for source in sources:
        nbytes = itemsize * _numel(source.shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {}
        for source in shard:
            tensor = source.make()
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{source.name} has non-finite values; refusing to write it")
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[source.name] = tensor.to("cpu").contiguous()
            total += tensors[source.name].numel() * tensors[source.name].element_size()
            weight_map[source.name] = file_name
        save_file(tensors, folder / file_name, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_config(folder: Path, model: torch.nn.Module, dtype: torch.dtype, eos_token_id: int | None) -> None:
    """``config.json``: the backbone's config, ``quantization_config`` removed, dtype set."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    if getattr(config, "eos_token_id", None) is None and eos_token_id is not None:
        config.eos_token_id = eos_token_id
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.pop("quantization_config", None)
    data["dtype"] = data["torch_dtype"] = DTYPE_NAMES[dtype]  # torch_dtype: for transformers < 4.56
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_generation_config(folder: Path, model: torch.nn.Module, tokenizer) -> None:
    """``generation_config.json`` from the backbone's, with the tokenizer's EOS among ``eos_token_id``."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    eos = config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    config.eos_token_id = ids[0] if len(ids) == 1 else (ids or None)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(str(folder))


def write_tokenizer(folder: Path, tokenizer, source: Path | None) -> None:
    """The base folder's tokenizer files copied verbatim (or ``save_pretrained`` when there are none),
    plus peso's fallback chat template when the tokenizer has none (the one ``messages`` data used)."""
    from pesocli.data.templates import fallback_chat_template

    copied = [name for name in TOKENIZER_FILES if source is not None and (source / name).is_file()]
    if copied:
        for name in copied:
            shutil.copyfile(source / name, folder / name)
    else:
        tokenizer.save_pretrained(str(folder))
    if not getattr(tokenizer, "chat_template", None):
        template = fallback_chat_template()
        (folder / "chat_template.jinja").write_text(template)
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():  # older transformers read the template only from here
            data = json.loads(config_path.read_text())
            data["chat_template"] = template
            config_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_model_folder(
    folder: Path,
    model: torch.nn.Module,
    tokenizer,
    sources: list[TensorSource],
    dtype: torch.dtype,
    tokenizer_source: Path | None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Everything a model folder holds: weights + index, config, generation config, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder, sources, dtype, max_shard_bytes)
    write_config(folder, model, dtype, tokenizer.eos_token_id)
    write_generation_config(folder, model, tokenizer)
    write_tokenizer(folder, tokenizer, tokenizer_source)


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
