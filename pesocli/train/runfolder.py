"""The run folder ``runs/<name>/``: resolved config, metrics, restart events, checkpoints, final state.

Layout::

    runs/<name>/
      config.yaml          resolved config (CLI > YAML > defaults); the base of ``--resume``
      metrics.jsonl        one record per logged optimizer step (+ eval records)
      restarts.jsonl       one record per restart and layer (``RestartRecord``; ``step`` 1-based, version 2)
      checkpoints/
        step-NNNNNN/       resumable state after N optimizer steps (see ``pesocli.train.state``)
        latest             the name of the newest checkpoint, rewritten after it is complete
      final/               adapters, anchors, optimizer, method state (safetensors + JSON)
      summary.json         initial/final loss, restarts, wall time
      tensorboard/         when ``tensorboard`` is installed

The folder is created only once every input has been validated and the model, data and method
are built. A fresh run that fails before its first checkpoint is written removes its folder
again (nothing half-written is left); a run with a checkpoint keeps it, for ``--resume``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from pesocli.config import RunConfig, config_to_dict
from pesocli.errors import ConfigError
from pesocli.inspect.runlog import restart_step
from pesocli.train.state import atomic_write_text, storage_error

_STEP_DIR = re.compile(r"^step-(\d+)$")
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{step: folder}`` of ``run_dir/checkpoints/step-*`` in step order (complete or not)."""
    folder = Path(run_dir) / "checkpoints"
    found = {}
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def check_free(cfg: RunConfig) -> None:
    """Fail early (before any model is loaded) when the run folder exists and may not be replaced."""
    path = cfg.run_dir
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run folder {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not cfg.train.overwrite:
        raise ConfigError(f"run folder {path} exists; pass --overwrite, --resume {path} or choose --run-name")


class RunPaths:
    """Where a run folder keeps its checkpoints and final state (shared by every rank's view)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)


class RunFolder(RunPaths):
    """Owns the files of one run; appends JSONL records and flushes each line."""

    def __init__(self, path: Path, *, purge_step: int | None = None) -> None:
        super().__init__(path)
        try:
            self._metrics = open(path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            self._restarts = open(path / "restarts.jsonl", "a", buffering=1)  # noqa: SIM115
        except OSError as exc:
            raise storage_error(exc, path) from exc
        self._tensorboard = _tensorboard_writer(path / "tensorboard", purge_step)

    @classmethod
    def create(cls, cfg: RunConfig) -> RunFolder:
        """A new run folder holding only ``config.yaml`` (``overwrite`` replaces an existing one)."""
        check_free(cfg)
        path = cfg.run_dir
        try:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            _write_config(cfg, path)
            return cls(path)
        except BaseException as exc:
            shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, OSError):
                raise storage_error(exc, path) from exc
            raise

    @classmethod
    def reopen(cls, cfg: RunConfig, step: int) -> RunFolder:
        """The run folder of a resumed run, its logs cut back to the ``step`` steps its checkpoint holds.

        Records of steps after ``step`` (written before the run died) are dropped, so every step is
        logged exactly once; ``config.yaml`` is rewritten (only resume-safe keys can differ).
        """
        path = cfg.run_dir
        try:
            _remove_leftovers(path)
            _write_config(cfg, path)
            _truncate_jsonl(path / "metrics.jsonl", lambda r: int(r.get("step", 0)) <= step)
            # a restart logged as step t (1-based) ran before step t: kept if the checkpoint holds t - 1
            _truncate_jsonl(path / "restarts.jsonl", lambda r: restart_step(r) <= step)
        except OSError as exc:
            raise storage_error(exc, path) from exc
        return cls(path, purge_step=step + 1)

    def has_checkpoint(self) -> bool:
        return bool(list_checkpoints(self.path))

    def commit_checkpoint(self, step: int, keep_last: int) -> None:
        """Point ``latest`` at the checkpoint of ``step`` (written last), then drop the oldest ones."""
        try:
            atomic_write_text(self.checkpoints / LATEST, checkpoint_name(step) + "\n")
        except OSError as exc:
            raise storage_error(exc, self.checkpoints / LATEST) from exc
        if keep_last:
            existing = [p for s, p in list_checkpoints(self.path).items() if s != step]
            for old in existing[: max(len(existing) - (keep_last - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)

    def log_metrics(self, record: dict[str, Any]) -> None:
        self._write(self._metrics, record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def log_restarts(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._write(self._restarts, record)

    def _write(self, handle, record: dict[str, Any]) -> None:
        try:
            handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise storage_error(exc, handle.name) from exc

    def write_summary(self, summary: dict[str, Any]) -> None:
        try:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise storage_error(exc, self.path / "summary.json") from exc

    def close(self) -> None:
        for handle in (self._metrics, self._restarts):
            try:
                handle.close()
            except OSError:
                pass  # a full disk: the error that got us here is the one to report
        if self._tensorboard is not None:
            self._tensorboard.close()

    def remove(self) -> None:
        """Delete the whole run folder (a fresh run that failed before its first checkpoint)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _write_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _remove_leftovers(path: Path) -> None:
    """Temporary folders and files of writes a kill interrupted (``.<name>.tmp-*``, ``.<name>.old-*``)."""
    for folder in (path, path / "checkpoints"):
        if not folder.is_dir():
            continue
        for child in folder.glob(".*"):
            if ".tmp-" in child.name or ".old-" in child.name:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _truncate_jsonl(path: Path, keep) -> None:
    if not path.is_file():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line cut short by a kill: nothing after it was written either
        if keep(record):
            lines.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _tensorboard_writer(path: Path, purge_step: int | None = None):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step)
