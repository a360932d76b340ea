"""One typed config tree for a run, parsed and validated once: command line > YAML > defaults.

``RunConfig`` holds one dataclass per section (``model``, ``data``, ``method``, ``fullgrad``,
``optim``, ``train``, ``checkpoint``). Defaults live only in these dataclasses. ``method`` is the
concrete ``METHODS[name].Config`` of the chosen method; its YAML section is flat
(``method: {name: peso-r, rank: 8, restart_every: 500}``) and its name is ``RunConfig.method_name``.

:func:`load_config` reads a YAML file and dotted overrides (``optim.lr``, ``method.name``),
coerces strings (``--set key=value``) to each field's type, and raises one :class:`ConfigError`
listing one line per bad field. Components receive their section, not the tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from pesocli.data.config import DataConfig
from pesocli.errors import ConfigError
from pesocli.fullgrad import FullGradConfig

if TYPE_CHECKING:
    from pesocli.methods.base import Method, MethodConfig

DEFAULT_METHOD = "peso-r"
"""The method a run uses when neither the YAML nor the command line names one."""

EMBEDDED_CONFIG = "tiny-peso-r.yaml"
"""The ready-made demo config ``peso train`` starts from when no ``--config`` is given and the model is
the built-in ``tiny`` one (see :func:`default_config_path`); any other model starts from the defaults."""

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(kw_only=True)
class ModelConfig:
    """The backbone."""

    name: str = "tiny"
    """``tiny`` (built-in tiny Llama), a local folder, a Hugging Face id in the local cache, an alias
    from ``pesocli.models.MODEL_ALIASES`` (``llama-3.1-8b``), a ``.gguf`` file, or a GGUF alias from
    ``pesocli.gguf_models.GGUF_ALIASES`` (``smollm2-135m``). A folder or file is saved as an absolute
    path, so the run reloads it from anywhere."""
    gguf_file: str | None = None
    """A ``.gguf`` file inside the ``name`` folder (or cached repo) to load instead of safetensors,
    dequantised to ``dtype``. Not needed when ``name`` is the ``.gguf`` file or a GGUF alias."""
    dtype: str = "auto"
    """Backbone precision: ``auto`` (BF16 on CUDA, FP32 on CPU), ``bf16`` or ``fp32``."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run (``--trust-remote-code``)."""
    quant: str = "none"
    """Backbone quantisation with bitsandbytes: ``none``, ``nf4`` or ``fp4`` (4-bit, QLoRA-style) or
    ``int8`` (LLM.int8()). Every linear layer but ``lm_head`` is quantised; the quantised base is
    never written (restarts go into the FP32 anchor). See ``pesocli/quant.py``."""
    double_quant: bool = True
    """4-bit only: also quantise the per-block scales (QLoRA's double quantisation, ~0.4 bit per
    weight less). Ignored for ``none`` and ``int8``."""
    compute_dtype: str = "auto"
    """4-bit only: the dtype the dequantised weight is multiplied in: ``auto`` (the backbone
    dtype), ``bf16`` or ``fp32``."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during the backward (``--gradient-checkpointing``):
    much less activation memory for about a third more step time. Full-gradient sketches stay exact."""

    def validate(self) -> list[str]:
        errors = []
        if not self.name:
            errors.append("model.name must not be empty")
        if self.gguf_file is not None and not self.gguf_file.lower().endswith(".gguf"):
            errors.append(f"model.gguf_file must name a .gguf file (got {self.gguf_file!r})")
        elif self.gguf_file is not None and self.name.lower().endswith(".gguf"):
            errors.append("model.gguf_file is set and model.name is a .gguf file: pass only one of them")
        if self.dtype not in ("auto", "bf16", "fp32"):
            errors.append(f"model.dtype must be auto, bf16 or fp32 (got {self.dtype!r})")
        if self.quant not in ("none", "nf4", "fp4", "int8"):
            errors.append(f"model.quant must be none, nf4, fp4 or int8 (got {self.quant!r})")
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            errors.append(f"model.compute_dtype must be auto, bf16 or fp32 (got {self.compute_dtype!r})")
        elif self.compute_dtype != "auto" and self.quant not in ("nf4", "fp4"):
            errors.append(
                f"model.compute_dtype applies to 4-bit backbones only (model.quant is "
                f"{self.quant!r}); leave it auto"
            )
        return errors


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW over the trainable parameters and the learning-rate schedule."""

    lr: float = 2e-4
    """Peak learning rate (the PESO paper's NLG grid: 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.999
    """AdamW second-moment decay (restart methods may warm it back up after a restart)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: ``cosine`` (to 0), ``linear`` (to 0) or ``constant``."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def validate(self) -> list[str]:
        errors = []
        if self.lr <= 0:
            errors.append(f"optim.lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            errors.append(f"optim.weight_decay must be >= 0 (got {self.weight_decay})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.append(f"optim.{name} must be in [0, 1) (got {value})")
        if self.eps <= 0:
            errors.append(f"optim.eps must be > 0 (got {self.eps})")
        if self.scheduler not in ("cosine", "linear", "constant"):
            errors.append(f"optim.scheduler must be cosine, linear or constant (got {self.scheduler!r})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            errors.append(f"optim.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0:
            errors.append(f"optim.max_grad_norm must be >= 0 (got {self.max_grad_norm})")
        return errors


@dataclass(kw_only=True)
class TrainConfig:
    """Length, batching, logging and where the run folder goes."""

    seed: int = 42
    """Seed for model init, data shuffling, dropout and sketches."""
    max_steps: int | None = None
    """Optimizer steps to run; ``None`` runs ``epochs`` over the data. Wins over ``epochs`` when set."""
    epochs: float = 1.0
    """Passes over the training data when ``max_steps`` is ``None`` (fractions allowed)."""
    batch_size: int = 8
    """Sequences per micro-batch (per device)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size x grad_accum)."""
    eval_every: int = 0
    """Evaluate the validation loss every N optimizer steps (and at the end); 0 only at the end."""
    log_every: int = 1
    """Write a ``metrics.jsonl`` record every N optimizer steps."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    output_dir: str = "runs"
    """Folder that holds the run folders."""
    run_name: str | None = None
    """Name of the run folder under ``output_dir``; ``None`` becomes ``<method>-<YYYYmmdd-HHMMSS>``."""
    quiet: bool = False
    """No progress bar or summary table (errors are still printed)."""
    overwrite: bool = False
    """Replace an existing run folder of the same name instead of failing."""
    nan_policy: str = "stop"
    """A step with a non-finite loss or gradient (or a loss spike): ``stop`` writes the last good state
    as a checkpoint and exits, naming the step and layer; ``skip`` drops that step's update and goes on."""
    loss_spike_factor: float | None = None
    """Loss watchdog: a step whose loss is above this factor times the median of the last 20 accepted
    step losses is handled like a non-finite one (``nan_policy``); ``None`` turns the watchdog off."""
    max_consecutive_skips: int = 10
    """With ``nan_policy: skip``, stop anyway (as ``stop`` does) after this many bad steps in a row."""
    export: tuple[str, ...] = ("anchored",)
    """Exports written into ``<run>/export/<format>/`` when training ends (``anchored``, ``adapter``,
    ``merged``); ``none`` (or an empty list) writes none. ``peso export`` writes more later."""
    nproc: int = 1
    """Training processes on this machine, one per GPU (gloo CPU processes without one); ``peso train``
    starts them through ``torch.distributed.run``; under ``torchrun`` it is set to the number started.
    The global batch per optimizer step is ``nproc x batch_size x grad_accum`` sequences, and a run
    gives the same adapters with any ``nproc`` for the same global batch."""
    fsdp: bool = False
    """Shard the frozen backbone over the processes with FSDP2 (``fully_shard`` per decoder layer), for
    backbones that do not fit one device; adapters and anchors stay replicated. Needs ``nproc > 1``
    (or ``torchrun``); not with ``model.quant``."""
    dist_timeout: float = 1800.0
    """Seconds a process waits for the others (any collective, a checkpoint being written) before it
    gives up and ends the run."""

    def validate(self) -> list[str]:
        errors = []
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"train.max_steps must be >= 1 or None (got {self.max_steps})")
        if self.epochs <= 0:
            errors.append(f"train.epochs must be > 0 (got {self.epochs})")
        for name in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if value < 1:
                errors.append(f"train.{name} must be >= 1 (got {value})")
        if self.eval_every < 0:
            errors.append(f"train.eval_every must be >= 0 (got {self.eval_every})")
        if not _DEVICE.match(self.device):
            errors.append(f"train.device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")
        if not self.output_dir:
            errors.append("train.output_dir must not be empty")
        if self.run_name is not None and (self.run_name in ("", ".", "..") or "/" in self.run_name):
            errors.append(f"train.run_name must be a plain folder name (got {self.run_name!r})")
        if self.nan_policy not in ("stop", "skip"):
            errors.append(f"train.nan_policy must be stop or skip (got {self.nan_policy!r})")
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1.0:
            errors.append(f"train.loss_spike_factor must be > 1 or None (got {self.loss_spike_factor})")
        if self.max_consecutive_skips < 1:
            errors.append(f"train.max_consecutive_skips must be >= 1 (got {self.max_consecutive_skips})")
        if self.nproc < 1:
            errors.append(f"train.nproc must be >= 1 (got {self.nproc})")
        if not self.dist_timeout > 0:
            errors.append(f"train.dist_timeout must be > 0 seconds (got {self.dist_timeout})")
        unknown = [f for f in self.export if f not in ("anchored", "adapter", "merged", "none")]
        if unknown:
            errors.append(
                f"train.export: unknown format(s) {', '.join(unknown)}; use anchored, adapter, merged or none"
            )
        return errors


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints inside the run folder (``final/`` is always written)."""

    every: int = 500
    """Write a resumable checkpoint every N optimizer steps; 0: none by steps. A checkpoint is cheap:
    adapters, anchors, optimizer state and RNG, never the base weights (see ``pesocli.train.state``)."""
    every_minutes: float = 30.0
    """Also write one when this many minutes of training passed since the last one (so a preemption
    or a crash loses at most that much); 0: none by time. With ``every: 0`` too, only ``final/`` (and the
    checkpoint that SIGINT/SIGTERM or ``nan_policy: stop`` write) is written."""
    keep_last: int = 2
    """Step checkpoints to keep (oldest deleted first, after the new one and ``latest`` are written;
    ``final/`` is never deleted); 0 keeps all. Keep 2 or more so a damaged newest one has a fallback."""

    def validate(self) -> list[str]:
        errors = []
        if self.every < 0:
            errors.append(f"checkpoint.every must be >= 0 (got {self.every})")
        if self.every_minutes < 0:
            errors.append(f"checkpoint.every_minutes must be >= 0 (got {self.every_minutes})")
        if self.keep_last < 0:
            errors.append(f"checkpoint.keep_last must be >= 0 (got {self.keep_last})")
        return errors


def _default_method_config() -> MethodConfig:
    return _methods()[DEFAULT_METHOD].Config()


@dataclass(kw_only=True)
class RunConfig:
    """Everything one ``peso train`` run needs. Build it with :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training (and validation) data."""
    method_name: str = DEFAULT_METHOD
    """Key of ``pesocli.methods.METHODS`` (YAML/CLI key ``method.name``)."""
    method: MethodConfig = field(default_factory=_default_method_config)
    """The method's own config, an instance of ``METHODS[method_name].Config``."""
    fullgrad: FullGradConfig = field(default_factory=FullGradConfig)
    """How restarts estimate the full gradient's top singular triplets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, batching, logging, output."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    @property
    def run_dir(self) -> Path:
        """``<train.output_dir>/<train.run_name>`` (``run_name`` is filled by :func:`load_config`)."""
        return Path(self.train.output_dir) / (self.train.run_name or self.method_name)

    def validate(self) -> list[str]:
        """One message per bad field over every section (empty when valid)."""
        errors = []
        methods = _methods()
        if self.method_name not in methods:
            errors.append(_unknown_method(self.method_name, methods))
        elif type(self.method) is not methods[self.method_name].Config:
            errors.append(f"method: {type(self.method).__name__} is not the config of {self.method_name}")
        for name in SECTIONS:
            section_validate = getattr(getattr(self, name), "validate", None)
            if section_validate is not None:
                errors.extend(section_validate())
        return errors


SECTIONS: tuple[str, ...] = ("model", "data", "method", "fullgrad", "optim", "train", "checkpoint")
"""Section names in the order they are written to YAML."""


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "fullgrad": FullGradConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}
"""The dataclass of every section but ``method`` (whose class depends on ``method.name``)."""


def _methods() -> dict[str, type[Method]]:
    # Imported lazily: pesocli.methods pulls in torch, and the CLI imports this module only in bodies.
    from pesocli.methods import METHODS

    return METHODS


def _unknown_method(name: str, methods: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(methods), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"method.name: unknown method {name!r} ({hint}valid: {', '.join(methods)})"


# --------------------------------------------------------------------------------------- loading


@dataclass
class _Layer:
    """One source of settings: ``[(section, key, value)]`` plus where it came from."""

    source: str
    items: list[tuple[str, str, Any]]


def load_config(yaml_path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted keys); validated once.

    ``overrides`` values may be typed (``3e-4``) or strings from ``--set key=value``; strings are
    coerced to the field's type. A new ``method.name`` switches the method section's class first;
    method fields from the YAML that the new method lacks are then dropped (a YAML written for
    ``peso-r`` still works with ``--method lora``). Raises :class:`ConfigError` listing every problem.
    """
    layers = []
    if yaml_path is not None:
        layers.append(_Layer(str(yaml_path), _flatten_yaml(read_yaml(yaml_path), str(yaml_path))))
    layers.append(_Layer("command line", _flatten_overrides(overrides or {})))
    cfg = _build(layers)
    if cfg.train.run_name is None:
        cfg.train.run_name = f"{cfg.method_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a validated config from nested sections (the inverse of :func:`config_to_dict`)."""
    return _build([_Layer(source, _flatten_yaml(data, source))])


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config as a mapping (empty file -> ``{}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of sections, got {type(data).__name__}")
    return data


def _flatten_yaml(data: dict[str, Any], source: str) -> list[tuple[str, str, Any]]:
    items = []
    for section, body in data.items():
        section = str(section)
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {_unknown(section, SECTIONS, 'section')}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping of keys, got {body!r}")
        items.extend((section, str(key), value) for key, value in body.items())
    return items


def _flatten_overrides(overrides: dict[str, Any]) -> list[tuple[str, str, Any]]:
    items = []
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{dotted}: {_unknown(section, SECTIONS, 'section')}")
        if not key:
            raise ConfigError(f"{dotted!r}: expected a dotted key like {section}.<field>")
        items.append((section, key, value))
    return items


def _build(layers: list[_Layer]) -> RunConfig:
    """Apply the layers over the defaults in order, then validate; raise once with every error."""
    methods = _methods()
    errors: list[str] = []
    # The method each layer was written for: the last name set up to and including that layer.
    written_for, name, name_layer = [], DEFAULT_METHOD, None
    for layer in layers:
        for section, key, value in layer.items:
            if (section, key) == ("method", "name"):
                name, name_layer = str(value), layer
        written_for.append(name)
    if name not in methods:
        message = _unknown_method(name, methods)
        raise ConfigError(_prefixed(name_layer, message) if name_layer is not None else message)
    cfg = RunConfig(method_name=name, method=methods[name].Config())

    for layer, layer_method in zip(layers, written_for, strict=True):
        for section, key, value in layer.items:
            if (section, key) == ("method", "name"):
                continue
            target = getattr(cfg, section)
            names = [f.name for f in dataclasses.fields(target)]
            if key not in names:
                # A field of the method this layer was written for, which a later layer replaced.
                if section == "method" and layer_method != name and _has_field(methods, layer_method, key):
                    continue
                errors.append(_prefixed(layer, _unknown_key(section, key, names, name, methods)))
                continue
            try:
                setattr(target, key, coerce(value, _field_types(type(target))[key]))
            except _Mismatch as exc:
                errors.append(_prefixed(layer, f"{section}.{key}: expected {exc.expected}, got {value!r}"))

    errors.extend(cfg.validate())
    if errors:
        raise ConfigError(_format_errors(errors))
    cfg.model.name = _absolute_if_on_disk(cfg.model.name)
    return cfg


def _absolute_if_on_disk(name: str) -> str:
    """A model folder or ``.gguf`` file as an absolute path, so the run's saved config reloads it from any
    working directory; ``tiny``, GGUF aliases and ids are returned unchanged (``resolve_model``'s order)."""
    from pesocli.gguf_models import GGUF_ALIASES, is_gguf_path

    path = Path(name).expanduser()
    if name == "tiny" or name.lower() in GGUF_ALIASES:
        return name
    if path.is_dir() or (path.is_file() and is_gguf_path(name)):
        return os.path.abspath(path)
    return name


def _has_field(methods: dict[str, type[Method]], method: str, key: str) -> bool:
    return method in methods and key in {f.name for f in dataclasses.fields(methods[method].Config)}


def _prefixed(layer: _Layer, message: str) -> str:
    return message if layer.source == "command line" else f"{message} (in {layer.source})"


def _format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} problems in the configuration:\n" + "\n".join(f"  {line}" for line in errors)


def _unknown(name: str, valid: typing.Iterable[str], what: str) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(valid)}"
    return f"unknown {what} {name!r} ({hint})"


def _unknown_key(section: str, key: str, names: list[str], method: str, methods: dict[str, Any]) -> str:
    if section == "method":
        owners = [m for m, cls in methods.items() if key in {f.name for f in dataclasses.fields(cls.Config)}]
        if owners:
            return f"method.{key}: method {method} has no such field (it belongs to {', '.join(owners)})"
        names = ["name", *names]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {section}.{close[0]}?" if close else f"valid: {', '.join(names)}"
    return f"{section}.{key}: unknown key ({hint})"


# ------------------------------------------------------------------------------------ coercion


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


_NONE_STRINGS = ("none", "null", "~", "")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` (typed, or a string from ``--set``) to the annotation ``tp``.

    Handles ``int``, ``float``, ``bool``, ``str``, ``Path``, ``X | None``, ``Literal``, ``tuple[T, ...]``,
    ``list[T]`` (from a list or a comma-separated string) and ``dict``. Raises ``_Mismatch``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).strip().lower() in _NONE_STRINGS):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch(_type_name(tp))
    if origin is Literal:
        for choice in args:
            try:
                candidate = coerce(value, type(choice))
            except _Mismatch:
                continue
            if candidate == choice:
                return candidate
        raise _Mismatch(_type_name(tp))
    if origin in (tuple, list):
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_type_name(tp))
        try:
            return origin(coerce(item, inner) for item in value)
        except _Mismatch:
            raise _Mismatch(_type_name(tp)) from None
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch("mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch("bool")
    if tp is int:
        return _to_int(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("float")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("str")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch("path")
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
    raise _Mismatch("int")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------------------------- writing


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain data (lists, not tuples; strings, not paths) with ``method.name`` first."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        body = {key: _plain(value) for key, value in dataclasses.asdict(getattr(cfg, name)).items()}
        out[name] = {"name": cfg.method_name, **body} if name == "method" else body
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def describe_default(key: str) -> str:
    """The dataclass default of a dotted key, as text for ``--help`` (per method for method fields)."""
    section, _, name = key.partition(".")
    if key == "method.name":
        return DEFAULT_METHOD
    if section == "method":
        from pesocli.methods.base import MethodConfig

        if name in MethodConfig.field_names():
            return _default_text(MethodConfig, name)
        owners = [m for m in _methods().values() if name in m.Config.field_names()]
        return ", ".join(f"{m.name}: {_default_text(m.Config, name)}" for m in owners) or "none"
    return _default_text(_SECTION_TYPES[section], name)


def _default_text(cls: type, name: str) -> str:
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "None" if value is None else str(value)


# -------------------------------------------------------------------------- ready-made configs


def commands_dir() -> Path:
    """The ready-made run configs: ``commands/`` in a checkout, ``pesocli/_commands`` in a wheel install."""
    package = Path(__file__).resolve().parent
    candidates = (package.parent / "commands", package / "_commands")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"the ready-made configs are missing (looked in {', '.join(map(str, candidates))})")


def shipped_configs() -> dict[str, Path]:
    """The ready-made run configs by name (file name without ``.yaml``), sorted (``peso configs``)."""
    return {path.stem: path for path in sorted(commands_dir().glob("*.yaml"))}


def resolve_config(value: str | Path) -> Path:
    """``--config VALUE``: a YAML file that exists, else the name of a shipped config
    (``smollm2-135m-peso-r``, with or without ``.yaml``, from any working directory). Raises a
    one-line :class:`ConfigError`."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"--config {value}: is a folder, not a YAML file")
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs()
    if len(path.parts) <= 1 or path.parent.resolve() == commands_dir().resolve():
        if name in shipped:
            return shipped[name]
    raise ConfigError(f"--config {value}: no such file and {unknown_config(name)}")


def unknown_config(name: str) -> str:
    """``no shipped config of that name (did you mean X? peso configs lists them)``."""
    close = difflib.get_close_matches(name, list(shipped_configs()), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"no shipped config named {name!r} ({hint}peso configs lists them)"


def embedded_config_path() -> Path:
    """The demo config ``peso train`` uses without ``--config`` on the tiny model: the shipped data."""
    return commands_dir() / EMBEDDED_CONFIG


def default_config_path(overrides: dict[str, Any]) -> Path | None:
    """The YAML a run without ``--config`` starts from: the embedded demo for the built-in tiny model
    (no ``model.name`` override, or ``tiny``), none for any other model, which gets the dataclass
    defaults that ``--help`` lists (the demo's lr 1e-2 and 300 steps fit only the random tiny model)."""
    model = overrides.get("model.name")
    return embedded_config_path() if model is None or str(model).strip() == "tiny" else None
