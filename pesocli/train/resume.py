"""Exact resume: what a checkpoint restores, which checkpoint is used, which config changes are allowed.

A checkpoint (``pesocli.train.state`` writes the files) restores everything the trajectory depends
on, so a resumed run computes the same losses and tensors as an uninterrupted one:

- adapters (each delta's ``state_dict``), anchors with their stacked rank, the method's JSON state
  (peso-r: ``restarts_done``, ``rescale_pending``);
- the optimizer's per-tensor state: moments, step counts and ``beta2`` warm-up position;
- the LR scheduler (and the learning rate it sets);
- RNG states: python, numpy, torch CPU and every CUDA device (dropout draws from them);
- the data position, ``(epoch, next batch)``, and the data statistics it was computed on;
- the loop's counters (tokens, restarts, the losses the summary and the loss watchdog need).

The restart schedule is a function of the step, and every restart draws its sketch test matrix
from ``fullgrad.seed``, so both follow from the step and the config.

Config policy: a resumed run must use the config it was started with. Only the keys in
:data:`RESUME_SAFE_KEYS` may change (logging, evaluation, checkpointing, device, the NaN policy and
watchdog, and where the run folder is); they do not change what the next step computes.
Everything else is refused with a one-line diff, ``train.max_steps`` and ``train.epochs`` included:
the cosine schedule and per-epoch restarts are laid out over the run's length.

Which checkpoint: the newest ``checkpoints/step-*`` whose files match its ``manifest.json``; a
damaged one (missing file, wrong sha256) is named in a warning and the one before it is tried.
A run whose ``final/`` state is complete has finished and is not resumed.
"""

from __future__ import annotations

import copy
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.errors import ConfigError, MissingRunError

if TYPE_CHECKING:
    import torch

    from pesocli.config import RunConfig
    from pesocli.engine import Engine
    from pesocli.optim import PesoAdamW
    from pesocli.train.guards import Watchdog
    from pesocli.train.stream import BatchStream

RESUME_SAFE_KEYS: tuple[str, ...] = (
    "train.quiet",
    "train.log_every",
    "train.eval_every",
    "train.device",
    "train.output_dir",
    "train.run_name",
    "train.overwrite",
    "train.nan_policy",
    "train.loss_spike_factor",
    "train.max_consecutive_skips",
    "model.trust_remote_code",
    "checkpoint.every",
    "checkpoint.every_minutes",
    "checkpoint.keep_last",
    "train.dist_timeout",
    "train.fsdp",
)
"""Config keys that may differ between a run and its resumption (nothing else may)."""

RESUME_STATE_VERSION = 1
"""Bumped when the resume keys of ``state.json`` change incompatibly."""


def warn(message: str) -> None:
    """A warning on stderr (shown with ``--quiet`` too; above the progress bar while it runs)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- config diff


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key outside :data:`RESUME_SAFE_KEYS` that differs."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_SAFE_KEYS or old.get(key) == new.get(key):
            continue
        changes.append(f"{key}: {_show(old.get(key, '(unset)'))} -> {_show(new.get(key, '(unset)'))}")
    return changes


def check_config_unchanged(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """Raise :class:`ConfigError` (one line) when ``cfg`` differs from ``saved`` in an unsafe key."""
    from pesocli.config import config_to_dict

    changes = config_changes(saved, config_to_dict(cfg))
    if changes:
        raise ConfigError(
            f"cannot resume {where} with a changed config ({'; '.join(changes)}); only "
            f"{', '.join(RESUME_SAFE_KEYS)} may change on resume"
        )


# ------------------------------------------------------------------------------ finding a state


@dataclass
class ResumePoint:
    """A verified state folder to continue from."""

    folder: Path
    state: dict[str, Any]
    step: int
    finished: bool
    """``final/`` of a completed run (nothing left to do)."""


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """The newest good state of ``run_dir``: a complete ``final/``, else the newest good checkpoint.

    Every damaged state passed over is named in a warning. ``None`` when there is nothing good.
    """
    from pesocli.train.runfolder import list_checkpoints
    from pesocli.train.state import read_state_json, verify_state

    final = Path(run_dir) / "final"
    if final.exists():
        problem = verify_state(final)
        if problem is None:
            state = read_state_json(final)
            if int(state.get("step", 0)) >= int(state.get("total_steps", state.get("step", 0))):
                return ResumePoint(final, state, int(state["step"]), finished=True)
        else:
            warn(f"final state {final} is damaged ({problem}); resuming from the newest good checkpoint")
    for step, folder in reversed(list_checkpoints(run_dir).items()):
        problem = verify_state(folder)
        if problem is None:
            return ResumePoint(folder, read_state_json(folder), step, finished=False)
        warn(f"checkpoint {folder} is damaged ({problem}); falling back to the one before it")
    return None


def require_resume_point(run_dir: Path) -> ResumePoint:
    """:func:`find_resume_point`, or a one-line :class:`ConfigError` saying why nothing can resume."""
    if not Path(run_dir).is_dir():
        raise MissingRunError(f"--resume: run folder {run_dir} does not exist")
    point = find_resume_point(run_dir)
    if point is None:
        raise MissingRunError(
            f"--resume: {run_dir} has no good checkpoint to resume from (the run stopped before its "
            f"first checkpoint, or all are damaged); checkpoints come every checkpoint.every steps "
            f"(--checkpoint-every) and checkpoint.every_minutes minutes (--checkpoint-minutes)"
        )
    if point.state.get("resume_version") != RESUME_STATE_VERSION and not point.finished:
        raise ConfigError(f"--resume: {point.folder} holds no resume state (written by an older peso)")
    return point


# --------------------------------------------------------------------------- resolving --resume


def resolve_resume(
    spec: str, config_path: Path | None, overrides: dict[str, Any]
) -> tuple[RunConfig, Path | None]:
    """The run config and the run folder to resume (``None``: start a fresh run) for ``--resume SPEC``.

    ``SPEC`` is a run folder (a path, or a name under the output dir): its ``config.yaml`` (or
    ``--config``) with the command-line options on top is the config. ``auto``: the config comes
    from ``--config`` (or the embedded demo for the tiny model) as for a fresh run; with a run name
    (``--run-name`` or ``train.run_name``) that run folder is resumed when it has a checkpoint, and
    otherwise the newest unfinished run under the output dir with the same config is; a fresh run
    starts when there is none.
    """
    from pesocli.config import default_config_path, load_config, read_yaml

    if overrides.get("train.overwrite") in (True, "true", "True", "1"):
        raise ConfigError("--resume and --overwrite exclude each other")
    if spec != "auto":
        folder = _run_folder(spec, config_path, overrides)
        base = config_path if config_path is not None else folder / "config.yaml"
        if not Path(base).is_file():
            raise ConfigError(f"--resume: {folder} is not a peso run folder (no config.yaml)")
        cfg = load_config(base, overrides)
        cfg.train.output_dir, cfg.train.run_name = str(folder.parent), folder.name
        return cfg, folder

    yaml_path = config_path if config_path is not None else default_config_path(overrides)
    cfg = load_config(yaml_path, overrides)
    from_yaml = read_yaml(yaml_path) if yaml_path is not None else {}
    named = "train.run_name" in overrides or (from_yaml.get("train") or {}).get("run_name")
    if named:
        folder = cfg.run_dir
        if _has_state(folder):  # verified (with warnings) by run_training
            return cfg, folder
        if folder.is_dir() and any(folder.iterdir()):
            if not (folder / "config.yaml").is_file():
                raise ConfigError(f"--resume auto: {folder} exists and is not a peso run folder")
            warn(f"{folder} has no good checkpoint; starting it again from step 0")
            cfg.train.overwrite = True
        return cfg, None
    match = _newest_matching_run(cfg)
    if match is not None:
        cfg.train.run_name = match.name
        return cfg, match
    return cfg, None


def _run_folder(spec: str, config_path: Path | None, overrides: dict[str, Any]) -> Path:
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder
    if "/" not in spec:
        from pesocli.config import TrainConfig

        output_dir = overrides.get("train.output_dir") or TrainConfig().output_dir
        if config_path is not None:
            from pesocli.config import read_yaml

            output_dir = overrides.get("train.output_dir") or (
                (read_yaml(config_path).get("train") or {}).get("output_dir") or output_dir
            )
        candidate = Path(str(output_dir)) / spec
        if candidate.is_dir():
            return candidate
    raise MissingRunError(f"--resume: run folder {spec} does not exist")


def _has_state(folder: Path) -> bool:
    from pesocli.train.runfolder import list_checkpoints

    return folder.is_dir() and (bool(list_checkpoints(folder)) or (folder / "final" / "state.json").is_file())


def _newest_matching_run(cfg: RunConfig) -> Path | None:
    """The unfinished run under the output dir with this config whose checkpoints changed last.

    Cheap: compares each run's ``config.yaml``; the chosen run's checkpoints are verified later.
    """
    from pesocli.config import config_to_dict, read_yaml

    root = Path(cfg.train.output_dir)
    if not root.is_dir():
        return None
    current = config_to_dict(cfg)
    best: tuple[float, Path] | None = None
    for folder in root.iterdir():
        if not _has_state(folder) or (folder / "final" / "state.json").is_file():
            continue
        try:
            saved = read_yaml(folder / "config.yaml")
        except ConfigError:
            continue
        if config_changes(saved, current):
            continue
        mtime = (folder / "checkpoints").stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, folder)
    return best[1] if best else None


# ----------------------------------------------------------------------------------------- RNG


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and numpy generator states as JSON, torch CPU and CUDA ones as tensors."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    data = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    return data, tensors


def restore_rng(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Undo :func:`capture_rng` (CUDA states only where the same devices are visible)."""
    import numpy as np
    import torch

    py = data["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = data["numpy"]
    keys = np.array(npy["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------ trainer state


@dataclass
class RunCounters:
    """The loop's running totals (all JSON)."""

    tokens: int = 0
    restarts: int = 0
    restart_seconds: float = 0.0
    wall_seconds: float = 0.0
    """Training time of earlier sessions of this run (a resumed run adds its own)."""
    initial_loss: float | None = None
    loss_tail: list[float] = field(default_factory=list)
    """The last accepted step losses (the summary's final loss averages up to 10 of them)."""

    def add_loss(self, loss: float) -> None:
        if self.initial_loss is None:
            self.initial_loss = loss
        self.loss_tail = [*self.loss_tail, loss][-10:]

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Mark:
    """The cheap part of the trainer state at one moment (RNG, data position, counters, schedule)."""

    rng: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    data: dict[str, Any]
    counters: dict[str, Any]
    watchdog: dict[str, Any]
    scheduler: dict[str, Any]


@dataclass
class TrainerState:
    """Everything a checkpoint holds, by reference to the live objects; :meth:`save` / :meth:`load`."""

    cfg: RunConfig
    engine: Engine
    optimizer: PesoAdamW
    scheduler: Any
    stream: BatchStream
    watchdog: Watchdog
    counters: RunCounters
    total_steps: int
    data_stats: dict[str, Any]

    def mark(self) -> Mark:
        rng, rng_tensors = capture_rng()
        return Mark(
            rng=rng,
            rng_tensors=rng_tensors,
            data=self.stream.state_dict(),
            counters=copy.deepcopy(self.counters.state_dict()),
            watchdog=self.watchdog.state_dict(),
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
        )

    def save(self, folder: Path, step: int, mark: Mark | None = None, *, final: bool = False) -> Path:
        """Write the state after ``step`` optimizer steps (``mark``: RNG/data/counters taken earlier).

        ``final``: the finished run's ``final/``, which is never resumed: no ``rng.safetensors``.
        """
        from pesocli.config import config_to_dict
        from pesocli.train.state import save_state

        mark = mark or self.mark()
        meta = {
            "resume_version": RESUME_STATE_VERSION,
            "step": step,
            "total_steps": self.total_steps,
            "method": self.cfg.method_name,
            "method_state": self.engine.method.state_dict(),
            "model": self.cfg.model.name,
            "scheduler": mark.scheduler,
            "config": config_to_dict(self.cfg),
            "data": {**mark.data, **self.data_stats},
            "rng": mark.rng,
            "counters": mark.counters,
            "watchdog": mark.watchdog,
        }
        rng = {} if final else {"rng.safetensors": mark.rng_tensors}
        return save_state(folder, self.engine.layers, self.optimizer, meta, extra_tensors=rng)

    def check_compatible(self, point: ResumePoint) -> None:
        """Refuse a checkpoint whose data, length or adapted layers differ from this run's."""
        state = point.state
        data = state["data"]
        changed = [
            f"{k}: {data.get(k)} -> {v}"
            for k, v in {**self.data_stats, **self.stream.state_dict()}.items()
            if k not in ("epoch", "index") and data.get(k) != v
        ]
        if changed:
            changes = "; ".join(changed)
            raise ConfigError(f"cannot resume {point.folder}: the training data changed ({changes})")
        if int(state["total_steps"]) != self.total_steps:
            raise ConfigError(
                f"cannot resume {point.folder}: the run has {state['total_steps']} steps, this config "
                f"gives {self.total_steps}"
            )
        saved_layers = set(state.get("layers", {}))
        if saved_layers != set(self.engine.layers):
            differ = ", ".join(sorted(saved_layers ^ set(self.engine.layers))[:3])
            raise ConfigError(f"cannot resume {point.folder}: the model's adapted layers differ ({differ})")

    def load(self, point: ResumePoint) -> int:
        """Restore everything from ``point``; returns the number of steps it holds."""
        from pesocli.train.state import load_layer_tensors, load_optimizer_state, read_tensors

        self.check_compatible(point)
        state, folder = point.state, point.folder
        load_layer_tensors(folder, self.engine.layers)
        self.engine.method.load_state_dict(state["method_state"])
        load_optimizer_state(folder, state, self.engine.layers, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        self.stream.load_state_dict(state["data"])
        self.counters.load_state_dict(state["counters"])
        self.watchdog.load_state_dict(state["watchdog"])
        restore_rng(state["rng"], read_tensors(folder, "rng.safetensors"))
        return int(state["step"])
