"""Finding and loading backbones: the built-in tiny Llama, local folders, GGUF files and the offline HF cache.

peso never downloads weights. ``--model`` takes ``tiny``, a local folder written by
``save_pretrained``, a Hugging Face id already in the local cache, a short alias from
:data:`MODEL_ALIASES`, a ``.gguf`` file (or a folder plus ``model.gguf_file``), or a GGUF alias
from :data:`~pesocli.gguf_models.GGUF_ALIASES` (``smollm2-135m``); GGUF weights are dequantised
into an ordinary model (:mod:`pesocli.gguf_models`). Everything heavy (torch, transformers) is
imported inside functions so the CLI's ``--help`` stays instant.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.errors import ConfigError, ModelError
from pesocli.gguf_models import GGUF_ALIASES, is_gguf_path, packaged_file

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from pesocli.config import ModelConfig

MODEL_ALIASES: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
}
"""Short names accepted by ``--model``, mapped to Hugging Face repository ids (the one table)."""

TINY = "tiny"
"""The built-in tiny Llama (``--model tiny``, the default)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Sizes shared by every tiny family: small enough for a CPU run in a minute, with GQA
# (4 query heads over 2 key/value heads) so the k/v projections are narrower than q/o.
_TINY_SIZES: dict[str, Any] = {
    "hidden_size": 96,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a ``--model`` value points."""

    kind: str
    """``tiny`` (built in), ``folder`` (a local directory), ``hub_cache`` (a snapshot in the HF cache)
    or ``gguf`` (a ``.gguf`` file in ``path``, loaded dequantised)."""
    path: Path | None
    """The folder to load from (``None`` for ``tiny``; the file's folder for ``gguf``)."""
    name: str
    """What the user passed (alias, id, folder, ``.gguf`` file or ``tiny``)."""
    repo_id: str | None = None
    """The Hugging Face id for ``hub_cache`` models (and ``gguf`` files found in the cache)."""
    gguf_file: str | None = None
    """For ``gguf``: the file's name inside ``path``."""

    @property
    def gguf_path(self) -> Path | None:
        """The ``.gguf`` file (absolute) of a ``gguf`` model, else ``None``."""
        if self.gguf_file is None or self.path is None:
            return None
        return self.path / self.gguf_file

    @property
    def spec(self) -> str:
        """A ``model.name`` that loads this same model again (``tiny``, a folder or a ``.gguf`` file)."""
        if self.kind == "tiny" or self.path is None:
            return self.name
        return str(self.gguf_path if self.gguf_path is not None else self.path)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache peso looks in (``HF_HUB_CACHE`` / ``HF_HOME`` aware)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model(
    name: str, cache_dir: str | Path | None = None, gguf_file: str | None = None
) -> ResolvedModel:
    """Resolve ``tiny``, a folder, a ``.gguf`` file, an alias or an ``org/name`` id to something loadable.

    ``gguf_file`` (``model.gguf_file``) names a ``.gguf`` file inside the folder or cached repo
    ``name``. Raises :class:`ModelError` (one line) when a folder or file does not exist, an id is
    not in the cache (saying where it looked and how to pass a folder), a GGUF alias's package is
    not installed, or a short name is not a known alias.
    """
    if gguf_file is not None:
        return _resolve_gguf_in(name, gguf_file, cache_dir)
    if name == TINY:
        return ResolvedModel(kind="tiny", path=None, name=name)
    if name.lower() in GGUF_ALIASES:
        file = packaged_file(name)
        return ResolvedModel(kind="gguf", path=file.parent, name=name, gguf_file=file.name)
    folder = Path(name).expanduser()
    if is_gguf_path(name):
        if not folder.is_file():
            raise ModelError(f"GGUF file {str(folder)!r} does not exist")
        file = folder.resolve()
        return ResolvedModel(kind="gguf", path=file.parent, name=name, gguf_file=file.name)
    if folder.is_dir():
        return ResolvedModel(kind="folder", path=folder.resolve(), name=name)
    repo_id = MODEL_ALIASES.get(name.lower())
    if repo_id is None and _HUB_ID.match(name) and not folder.exists():
        repo_id = name
    if repo_id is None:
        if name.startswith((".", "/", "~")) or "/" in name or "\\" in name:
            raise ModelError(f"model folder {str(folder)!r} does not exist")
        names = sorted([*MODEL_ALIASES, *GGUF_ALIASES])
        close = difflib.get_close_matches(name.lower(), [TINY, *names], n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ModelError(
            f"unknown model {name!r} ({hint}pass 'tiny', a local folder, a .gguf file, a Hugging Face id "
            f"(org/name) or an alias: {', '.join(names)})"
        )
    return ResolvedModel(kind="hub_cache", path=_cached_snapshot(repo_id, name, cache_dir), name=name,
                         repo_id=repo_id)


def _resolve_gguf_in(name: str, gguf_file: str, cache_dir: str | Path | None) -> ResolvedModel:
    """``model.gguf_file`` inside the folder (or cached Hugging Face repo) ``name``."""
    if not is_gguf_path(gguf_file):
        raise ModelError(f"model.gguf_file must name a .gguf file (got {gguf_file!r})")
    if name == TINY or name.lower() in GGUF_ALIASES or is_gguf_path(name):
        raise ModelError(f"model.gguf_file {gguf_file!r} needs model.name to be the folder that holds it "
                         f"(got {name!r})")
    folder, repo_id = Path(name).expanduser(), None
    if folder.is_dir():
        folder = folder.resolve()
    else:
        repo_id = MODEL_ALIASES.get(name.lower(), name)
        if not _HUB_ID.match(repo_id):
            raise ModelError(f"model folder {str(folder)!r} (for model.gguf_file {gguf_file}) does not exist")
        folder = _cached_snapshot(repo_id, name, cache_dir, need=gguf_file)
    if not (folder / gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise ModelError(f"{folder} has no GGUF file {gguf_file}{hint}")
    return ResolvedModel(kind="gguf", path=folder, name=name, repo_id=repo_id, gguf_file=gguf_file)


def _cached_snapshot(
    repo_id: str, name: str, cache_dir: str | Path | None, need: str = "config.json"
) -> Path:
    from huggingface_hub import snapshot_download

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: the weights are not here
        what = repo_id if name == repo_id else f"{repo_id} (alias {name})"
        raise ModelError(
            f"model {what} is not in the Hugging Face cache at {cache} and peso never downloads; "
            f"download it first (hf download {repo_id}) or pass a local folder: --model /path/to/folder"
        ) from exc
    if not (snapshot / need).is_file():
        raise ModelError(f"cached snapshot {snapshot} of {repo_id} has no {need}; pass a full folder")
    return snapshot


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; otherwise the named device, checked to exist.

    In a process ``torchrun`` started (``LOCAL_RANK`` set), ``auto`` and ``cuda`` mean this process's
    own GPU, ``cuda:LOCAL_RANK``; a fixed ``cuda:N`` is refused when several processes share the node.
    """
    import os

    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"train.device: not a device: {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        version = torch.__version__
        raise ConfigError(f"train.device: {name} requested but no CUDA device is visible (torch {version})")
    if device.type == "cuda" and local_rank is not None:
        local = int(local_rank)
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"train.device {name} names one GPU for every process on this node; use auto or cuda "
                "(process LOCAL_RANK i takes cuda:i)"
            )
        if device.index is None:
            if local >= torch.cuda.device_count():
                raise ConfigError(
                    f"process LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible; start at "
                    "most one process per GPU"
                )
            device = torch.device("cuda", local)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> BF16 on CUDA, FP32 elsewhere; ``bf16`` / ``fp32`` as named."""
    import torch

    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConfigError(f"model.dtype: expected auto, bf16 or fp32 (got {name!r})")
    return table[name]


def tiny_model_config(family: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``llama``, ``qwen2`` or ``mistral`` (2 layers, hidden 96, GQA 4/2 heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    families = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in families:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(families)}")
    kwargs = {**_TINY_SIZES, "vocab_size": vocab_size, **overrides}
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    return families[family](**kwargs)


def load_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer shipped in ``pesocli/assets/tiny-tokenizer/`` (pad token set)."""
    from transformers import AutoTokenizer

    from pesocli.paths import tiny_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()), local_files_only=True)
    return _ensure_pad_token(tokenizer)


TINY_LM_HEAD_STD = 0.1
"""Init std of the tiny model's ``lm_head`` (the rest uses transformers' 0.02).

Adapters never touch ``lm_head`` or the final norm, and the normed hidden state has RMS 1, so a
logit can reach at most about ``std * hidden`` (~2 with 0.02): too flat for a frozen random
backbone to express confident predictions. With 0.1 the adapters can learn the shipped data."""


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """The built-in tiny Llama in FP32, initialised from ``seed`` without touching the global RNG.

    Random weights (nothing is downloaded); ``lm_head`` gets std :data:`TINY_LM_HEAD_STD`.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_model_config(
        "llama",
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        torch.nn.init.normal_(model.lm_head.weight, std=TINY_LM_HEAD_STD)
    return model.float()


def load_model_and_tokenizer(
    cfg: ModelConfig, device: torch.device | str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the backbone (on ``device``, in ``cfg.dtype``, quantised as ``cfg.quant``) and its tokenizer.

    Never touches the network. A GGUF file (``gguf`` kind) is dequantised into a plain model in
    ``cfg.dtype`` (:func:`read_gguf`). With ``cfg.quant`` other than ``none`` every linear layer but
    ``lm_head`` is a bitsandbytes layer (see :mod:`pesocli.quant`): a folder or cached id is
    quantised by transformers while loading (``quantization_config``, ``device_map`` on
    ``device``); the tiny model and a GGUF file are built in full precision and quantised in place.
    Training-time switches (gradient checkpointing) are applied by :func:`prepare_model`.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(cfg.dtype, device)
    resolved = resolve_model(cfg.name, gguf_file=cfg.gguf_file)
    if resolved.kind == "tiny":
        tokenizer = load_tiny_tokenizer()
        return _placed(build_tiny_model(tokenizer), cfg, dtype, device), tokenizer
    if resolved.kind == "gguf":
        assert resolved.gguf_path is not None
        model, tokenizer = read_gguf(resolved.gguf_path, dtype)
        return _placed(model, cfg, dtype, device), tokenizer
    assert resolved.path is not None
    if not (resolved.path / "config.json").is_file():
        ggufs = sorted(p.name for p in resolved.path.glob("*.gguf"))
        hint = f"; to load its GGUF file, set model.gguf_file={ggufs[0]}" if ggufs else ""
        raise ModelError(f"{resolved.path} is not a model folder (no config.json){hint}")
    tokenizer = _load_tokenizer(resolved.path, cfg.trust_remote_code)
    if cfg.quant == "none":
        return _load_model(resolved.path, dtype, cfg.trust_remote_code).to(device), tokenizer
    from pesocli.quant import bnb_config, keep_cpu_layout

    # bitsandbytes quantises each weight as it is placed: load straight onto ``device``.
    quantised = {"quantization_config": bnb_config(cfg, dtype), "device_map": {"": device}}
    return keep_cpu_layout(_load_model(resolved.path, dtype, cfg.trust_remote_code, **quantised)), tokenizer


def read_gguf(file: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The ``.gguf`` ``file`` dequantised into a plain causal LM in ``dtype`` (on the CPU), and its tokenizer.

    transformers reads config, tokenizer (with the chat template) and weights from the file; no
    code from the file's folder runs (``trust_remote_code`` stays off). Slow: transformers parses
    the file's metadata once for the config, once for the weights and once for the tokenizer
    (25-35 s for the 98 MB SmolLM2-135M file on one CPU thread, most of it in the metadata).
    """
    from pesocli.gguf_models import dequantising_kwargs, make_plain, require_gguf_package

    require_gguf_package(file)
    tokenizer = _load_tokenizer(file.parent, False, gguf_file=file.name)
    model = _load_model(file.parent, dtype, False, **dequantising_kwargs(file.name))
    return make_plain(model), tokenizer


def _placed(model: PreTrainedModel, cfg: ModelConfig, dtype: torch.dtype,
            device: torch.device) -> PreTrainedModel:
    """A full-precision model built in memory, moved to ``dtype``/``device``, quantised as ``cfg.quant``."""
    model = model.to(dtype=dtype, device=device)
    if cfg.quant != "none":
        from pesocli.quant import quantize_linears

        quantize_linears(model, cfg, device)  # the same bitsandbytes layers transformers would build
    return model


def prepare_model(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Training-time switches of the backbone; call once, before training starts.

    ``cfg.gradient_checkpointing``: every decoder layer recomputes its activations in the backward
    (non-reentrant ``torch.utils.checkpoint``; transformers also makes the embedding output
    require grad, and drops the KV cache while checkpointing). The full-gradient probes of
    :class:`~pesocli.layers.AdaptedLinear` save the layer input through autograd, so under
    checkpointing they see the recomputed input and fire once per layer and micro-batch.
    """
    if not cfg.gradient_checkpointing:
        return model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; "
                         f"drop model.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _load_tokenizer(path: Path, trust_remote_code: bool, **extra: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {_first_line(exc)}") from exc
    return _ensure_pad_token(tokenizer)


def _load_model(path: Path, dtype: torch.dtype, trust_remote_code: bool, **extra: Any) -> PreTrainedModel:
    import transformers
    from transformers import AutoModelForCausalLM

    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; pass whichever this version reads.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code, **{dtype_key: dtype},
            **extra,
        )
    except (OSError, ValueError, ImportError) as exc:
        custom_code = not trust_remote_code and "gguf_file" not in extra  # a GGUF file never runs code
        hint = " (if the model needs custom code, pass --trust-remote-code)" if custom_code else ""
        where = path / extra["gguf_file"] if "gguf_file" in extra else path
        raise ModelError(f"cannot load a causal LM from {where}: {_first_line(exc)}{hint}") from exc


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Padding uses EOS when the tokenizer has no pad token (the usual case for base LMs)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {tokenizer.name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
