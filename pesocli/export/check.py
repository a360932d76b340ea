"""``peso export --check DIR``: validate an adapter or model folder against what vLLM accepts.

Every rule of ``vllm-adapter-rules.md`` that can be checked without vLLM, one problem per line:

- adapter folder: ``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules``; no
  ``modules_to_save``, ``use_dora``, ``bias``, ``rank_pattern``/``alpha_pattern``,
  ``layers_to_transform`` (rejected, or silently ignored by vLLM); ``r`` one of the allowed
  ranks; safetensors weights whose keys follow ``[base_model.model.]<module>.lora_A.weight``;
  every ``<module>`` the **full path** of a linear (or embedding) module of the base model (a
  wrong prefix loads in vLLM and is never applied); ``target_modules`` selecting it; shapes
  ``lora_A (r, in)``, ``lora_B (out, r)``; one floating dtype; finite values. When ``vllm`` is
  importable, its own ``PEFTHelper`` reads the config and validates it against a ``LoRAConfig``
  with the ``--max-lora-rank`` the adapter will be served with (an export's own serve command, or
  what the caller passes; without vLLM the same rank rule is checked here).
- model folder: ``config.json`` without ``quantization_config``; safetensors whose tensor
  names, shapes and dtype are exactly the model's (built from ``config.json`` on the meta
  device), all listed in the index; no stray safetensors or adapter files; a tokenizer with a
  chat template and an EOS that ``generation_config.json`` also stops on.
- an export written by peso (``peso_export.json``): each part as above (the adapter against
  the base the manifest names) and the sha256 of every listed file.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pesocli.export.compress import ALLOWED_RANKS
from pesocli.export.manifest import MANIFEST

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
"""The weight files vLLM tries, in order (``LoRAModel.from_local_checkpoint``)."""

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$"
)
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
EXAMPLES = 3
"""Examples named per kind of problem (the rest are counted)."""


@dataclass
class Report:
    """Problems found, grouped by kind so that 200 layers with one mistake print one line."""

    root: Path
    lines: list[str] = field(default_factory=list)
    _grouped: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, where: Path, message: str) -> None:
        self.lines.append(f"{self._rel(where)}: {message}")

    def group(self, where: Path, kind: str, example: str) -> None:
        """One more instance of a problem ``kind`` (printed once, with a few examples)."""
        self._grouped[(self._rel(where), kind)].append(example)

    def problems(self) -> list[str]:
        out = list(self.lines)
        for (where, kind), examples in self._grouped.items():
            shown = "; ".join(examples[:EXAMPLES])
            more = f" (+{len(examples) - EXAMPLES} more)" if len(examples) > EXAMPLES else ""
            out.append(f"{where}: {kind}: {shown}{more}")
        return out

    def _rel(self, path: Path) -> str:
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve())
            return str(rel) if str(rel) != "." else self.root.name
        except ValueError:
            return str(path)


def check_path(path: str | Path, base: str | Path | None = None,
               max_lora_rank: int | None = None) -> list[str]:
    """Every problem of the export, adapter folder or model folder at ``path`` (empty: vLLM-ready).

    ``base`` overrides the base model an adapter is checked against (a folder or a cached id);
    by default it is the one the export's manifest names, or ``base_model_name_or_path``.
    ``max_lora_rank`` is vLLM's ``--max-lora-rank`` the adapter must fit; by default the one in an
    export's serve command, else the largest vLLM accepts.
    """
    root = Path(path).expanduser()
    report = Report(root)
    if not root.is_dir():
        report.add(root, "not a folder")
        return report.problems()
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        manifest = _read_json(manifest_path, report)
        if manifest is _INVALID:
            return report.problems()
        check_hashes(root, manifest, report)
        parts = manifest.get("parts", {})
        if "model" in parts:
            check_model_folder(root / parts["model"], report)
        if "adapter" in parts:
            adapter_base = base or (root / parts["adapter_base"] if "adapter_base" in parts
                                    else parts.get("adapter_base_external"))
            check_adapter(root / parts["adapter"], adapter_base, report,
                          max_lora_rank or _served_max_lora_rank(manifest))
        if not parts:
            report.add(manifest_path, "names no parts (model/adapter)")
    elif (root / ADAPTER_CONFIG).is_file():
        check_adapter(root, base, report, max_lora_rank)
    elif (root / "config.json").is_file():
        check_model_folder(root, report)
    else:
        report.add(root, f"neither an adapter folder ({ADAPTER_CONFIG}) nor a model folder (config.json)")
    return report.problems()


_INVALID = object()


def _served_max_lora_rank(manifest: dict[str, Any]) -> int | None:
    """``--max-lora-rank`` of the export's ``serve_command`` (what serve.sh passes to vLLM)."""
    import shlex

    command = shlex.split(str(manifest.get("serve_command", "")))
    if "--max-lora-rank" not in command[:-1]:
        return None
    value = command[command.index("--max-lora-rank") + 1]
    return int(value) if value.isdigit() else None


def _read_json(path: Path, report: Report) -> Any:
    """The parsed JSON of ``path``, or ``_INVALID`` after reporting that it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        report.add(path, f"not valid JSON ({exc})")
        return _INVALID


# ----------------------------------------------------------------------------------- manifest


def check_hashes(root: Path, manifest: dict[str, Any], report: Report) -> None:
    """Every file listed in the manifest exists and has its recorded sha256."""
    from pesocli.hashing import sha256

    for rel, digest in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file():
            report.add(path, "listed in peso_export.json but missing")
        elif sha256(path) != digest:
            report.add(path, "sha256 differs from peso_export.json (modified after export)")


# ------------------------------------------------------------------------------------ adapter


def check_adapter(folder: Path, base: str | Path | None, report: Report,
                  max_lora_rank: int | None = None) -> None:
    """The adapter folder rules (see the module docstring); ``max_lora_rank``: vLLM's
    ``--max-lora-rank`` to fit (``None``: the largest allowed)."""
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        report.add(folder, f"no {ADAPTER_CONFIG}")
        return
    config = _read_json(config_path, report)
    if config is _INVALID:
        return
    if not isinstance(config, dict):
        report.add(config_path, "must be a JSON object")
        return
    rank = _check_adapter_config(config_path, config, report)
    served_rank = max_lora_rank or ALLOWED_RANKS[-1]
    if not _check_with_vllm(folder, served_rank, report):
        if served_rank not in ALLOWED_RANKS:
            report.add(folder, f"--max-lora-rank {served_rank} is not one vLLM accepts {list(ALLOWED_RANKS)}")
        elif rank is not None and rank > served_rank:
            report.add(config_path, f"r={rank} is greater than --max-lora-rank {served_rank}: vLLM refuses "
                                    "to load it (serve with a larger --max-lora-rank)")

    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        report.add(folder, "no adapter weights (adapter_model.safetensors)")
        return
    if weights.suffix != ".safetensors":
        report.add(weights, "not safetensors: peso cannot inspect pickled weights; save with safetensors")
        return
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one problem line
        report.add(weights, f"unreadable safetensors ({exc})")
        return

    modules: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            hint = (" (adapter name inside the key: save with save_pretrained, not state_dict())"
                    if re.search(r"\.lora_[AB]\.[^.]+\.weight$", key) else "")
            report.group(weights, "key vLLM rejects as 'unsupported LoRA weight'", f"{key}{hint}")
            continue
        modules[match["module"]][match["lin"] or match["emb"]] = tensor

    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    if len(dtypes) > 1:
        report.add(weights, f"mixed dtypes {sorted(dtypes)}: save every tensor in one of fp16, bf16, fp32")
    for name in dtypes - {"float16", "bfloat16", "float32"}:
        report.add(weights, f"dtype {name}: LoRA weights must be fp16, bf16 or fp32")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            report.group(weights, "non-finite values", key)

    table = _base_modules(folder, config, base, report)
    targets = config.get("target_modules")
    for module, parts in modules.items():
        embedding = any(k.startswith("lora_embedding") for k in parts)
        want = {"lora_embedding_A", "lora_embedding_B"} if embedding else {"lora_A", "lora_B"}
        if set(parts) != want:
            report.group(weights, "incomplete A/B pair", f"{module} has only {', '.join(sorted(parts))}")
        if targets is not None and not _targeted(module, targets):
            report.group(weights, "module not selected by target_modules (PEFT skips its weights)", module)
        if table is None:
            continue
        if module not in table:
            report.group(
                weights,
                "not a module of the base model: vLLM loads it and never applies it (wrong prefix)",
                f"{module}{_did_you_mean(module, table)}",
            )
            continue
        kind, out_features, in_features = table[module]
        if kind != ("embedding" if embedding else "linear"):
            report.group(weights, "LoRA on a module of the wrong kind", f"{module} is {kind}")
            continue
        if rank is not None:
            _check_shapes(weights, module, parts, rank, out_features, in_features, embedding, report)


def _check_adapter_config(path: Path, config: dict[str, Any], report: Report) -> int | None:
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            report.add(path, f"missing required key {key!r}")
    if config.get("peft_type", "LORA") != "LORA":
        report.add(path, f"peft_type {config['peft_type']!r}: vLLM serves only LORA adapters")
    if config.get("modules_to_save"):
        report.add(path, f"modules_to_save {config['modules_to_save']!r}: vLLM only supports null "
                         "(merge trained embed/lm_head into a model folder instead)")
    if config.get("use_dora"):
        report.add(path, "use_dora: true is rejected by vLLM")
    if config.get("bias", "none") != "none":
        report.add(path, f"bias {config['bias']!r}: vLLM requires 'none'")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            report.add(path, f"{key} is ignored by vLLM: those modules would be served with the wrong "
                             "rank/scale")
    if config.get("layers_to_transform") is not None:
        report.add(path, "layers_to_transform is ignored by vLLM")
    rank = config.get("r")
    if "r" in config and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        report.add(path, f"r must be a positive integer (got {rank!r})")
        return None
    if rank is not None and rank not in ALLOWED_RANKS:
        report.add(path, f"r={rank} is not an allowed vLLM LoRA rank {list(ALLOWED_RANKS)} "
                         "(pad with zeros to the next one, or compress)")
    alpha = config.get("lora_alpha")
    bad_alpha = not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0
    if "lora_alpha" in config and bad_alpha:
        report.add(path, f"lora_alpha must be a positive number (got {alpha!r})")
    return rank if isinstance(rank, int) else None


def _check_shapes(weights: Path, module: str, parts: dict[str, Any], rank: int, out_features: int,
                  in_features: int, embedding: bool, report: Report) -> None:
    if embedding:
        expect = {"lora_embedding_A": (rank, in_features), "lora_embedding_B": (out_features, rank)}
    else:
        expect = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
    for part, tensor in parts.items():
        if part in expect and tuple(tensor.shape) != expect[part]:
            report.group(weights, "shape mismatch",
                         f"{module}.{part} is {tuple(tensor.shape)}, expected {expect[part]} (r={rank})")


def _targeted(module: str, targets: Any) -> bool:
    """PEFT's rule: a string is a full-name regex; a list entry matches the name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _did_you_mean(module: str, table: dict[str, Any]) -> str:
    close = [n for n in table if n.endswith("." + module) or module.endswith("." + n)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _base_modules(folder: Path, config: dict[str, Any], base: str | Path | None,
                  report: Report) -> dict[str, tuple[str, int, int]] | None:
    """``{module path: (linear|embedding, out, in)}`` of the base model, or ``None`` (reported)."""
    name = base if base is not None else config.get("base_model_name_or_path")
    if not name:
        report.add(folder, "no base_model_name_or_path: cannot check module paths (pass --base)")
        return None
    from pesocli.gguf_models import GGUF_ALIASES, is_gguf_path

    if is_gguf_path(name) or str(name).lower() in GGUF_ALIASES:
        report.add(folder, f"base model {name} is a GGUF file: cannot check module paths against it (pass "
                           "--base with a model folder, e.g. the base/ that an adapter export writes)")
        return None
    base_folder = _resolve_base(str(name))
    if base_folder is None:
        report.add(folder, f"base model {name} not found (as a folder or in the HF cache): cannot check "
                           "module paths against it (pass --base)")
        return None
    model = _meta_model(base_folder, report)
    if model is None:
        return None
    import torch

    table = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            table[module_name] = ("linear", module.out_features, module.in_features)
        elif isinstance(module, torch.nn.Embedding):
            table[module_name] = ("embedding", module.embedding_dim, module.num_embeddings)
    return table


def _resolve_base(name: str) -> Path | None:
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder
    try:
        from pesocli.models import resolve_model

        resolved = resolve_model(name)
    except Exception:  # noqa: BLE001 - not found is reported by the caller
        return None
    return resolved.path


def _check_with_vllm(folder: Path, max_lora_rank: int, report: Report) -> bool:
    """vLLM's own ``PEFTHelper`` reads ``adapter_config.json`` and validates it against a
    ``LoRAConfig(max_lora_rank=...)``, as ``vllm serve --enable-lora`` does when it loads the adapter.

    Returns ``False`` when vLLM is not importable (the caller then checks the rank rule itself).
    """
    try:
        from vllm.config import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except Exception:  # noqa: BLE001 - vLLM absent (CPU machines without the vLLM venv) or broken
        return False
    try:
        lora_config = LoRAConfig(max_lora_rank=max_lora_rank)
    except Exception as exc:  # noqa: BLE001 - pydantic's message is long; its first line says it
        report.add(folder, f"vLLM refuses --max-lora-rank {max_lora_rank}: {_first_line(exc)}")
        return True
    try:
        helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
        helper.validate_legal(lora_config)
    except Exception as exc:  # noqa: BLE001 - whatever vLLM raises is the problem to show
        report.add(folder, f"vLLM's PEFTHelper rejects it: {_first_line(exc)}")
    return True


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else repr(exc)


# ------------------------------------------------------------------------------- model folder


def check_model_folder(folder: Path, report: Report) -> None:
    """The model folder rules (see the module docstring)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        report.add(folder, "no config.json")
        return
    config = _read_json(config_path, report)
    if config is _INVALID:
        return
    if "quantization_config" in config:
        report.add(config_path, "leftover quantization_config: vLLM would load the weights as quantised")
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        if (folder / name).exists():
            report.add(folder / name, "adapter file inside a model folder: keep adapters next to it, "
                                      "never inside")

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        report.add(folder, "no *.safetensors weights")
        return
    index_path = folder / "model.safetensors.index.json"
    listed = files
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            report.add(index_path, f"unreadable index ({exc})")
            return
        listed = sorted(set(weight_map.values()))
        for name in sorted(set(files) - set(listed)):
            report.add(folder / name, "stray safetensors: not in model.safetensors.index.json")
        for name in sorted(set(listed) - set(files)):
            report.add(index_path, f"lists {name}, which does not exist")
        listed = [n for n in listed if n in files]
    elif len(files) > 1 and "model.safetensors" in files:
        for name in files:
            if name != "model.safetensors":
                report.add(folder / name,
                           "stray safetensors: without an index vLLM loads every *.safetensors")

    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in listed:
        try:
            with safe_open(str(folder / name), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = handle.get_slice(key)
                    found[key] = (tuple(piece.get_shape()), piece.get_dtype())
                    if index_path.is_file() and weight_map.get(key) != name:
                        report.group(folder / name, "tensor not mapped to this file by the index", key)
        except Exception as exc:  # noqa: BLE001
            report.add(folder / name, f"unreadable safetensors ({exc})")
            return

    want_dtype = config.get("dtype") or config.get("torch_dtype")
    dtypes = {_SAFETENSORS_DTYPES.get(d, d) for _, d in found.values() if d in _SAFETENSORS_DTYPES}
    if len(dtypes) > 1:
        report.add(folder, f"mixed floating dtypes in the weights: {sorted(dtypes)}")
    elif dtypes and want_dtype and dtypes != {want_dtype}:
        report.add(config_path, f"dtype {want_dtype!r} but the weights are {dtypes.pop()}")

    model = _meta_model(folder, report)
    if model is not None:
        allowed = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        # Tied weights appear once among the parameters: only the first name is required.
        required = {n for n, _ in model.named_parameters()}
        required |= {n for n, _ in model.named_buffers() if n in allowed}
        for key in sorted(set(found) - set(allowed)):
            report.group(folder, "unknown tensor (vLLM: 'There is no module or parameter named ...')", key)
        for key in sorted(set(required) - set(found)):
            report.group(folder, "missing tensor", key)
        for key in sorted(set(found) & set(allowed)):
            if found[key][0] != allowed[key]:
                report.group(folder, "shape mismatch",
                             f"{key} is {found[key][0]}, the model has {allowed[key]}")
    _check_tokenizer(folder, config, report)


def _meta_model(folder: Path, report: Report):
    """The model of ``folder/config.json`` on the meta device (no weights, no memory), or ``None``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure is one problem line
        report.add(folder / "config.json", f"cannot build the model from it ({str(exc).splitlines()[0]})")
        return None


def _check_tokenizer(folder: Path, config: dict[str, Any], report: Report) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.add(folder, f"no loadable tokenizer ({reason})")
        return
    if not getattr(tokenizer, "chat_template", None):
        report.add(folder, "the tokenizer has no chat template (vLLM's chat endpoint needs one)")
    eos = tokenizer.eos_token_id
    if eos is None:
        report.add(folder, "the tokenizer has no EOS token")
        return
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        report.add(folder, f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embeddings")
    gen_path = folder / "generation_config.json"
    source = json.loads(gen_path.read_text()) if gen_path.is_file() else config
    stops = source.get("eos_token_id")
    stops = [] if stops is None else ([stops] if isinstance(stops, int) else list(stops))
    if eos not in stops:
        where = gen_path if gen_path.is_file() else folder / "config.json"
        report.add(where, f"eos_token_id {stops or None} does not include the tokenizer's EOS "
                          f"{tokenizer.eos_token!r} ({eos}): generation would not stop")
