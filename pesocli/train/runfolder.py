"""The run folder ``runs/<name>/``: resolved config, metrics, restart events, checkpoints, final state.

Layout::

    runs/<name>/
      config.yaml          resolved config (CLI > YAML > defaults)
      metrics.jsonl        one record per logged optimizer step (+ eval records)
      restarts.jsonl       one record per restart and layer (``RestartRecord``)
      checkpoints/step-NNNNNN/   resumable state every ``checkpoint.every`` steps
      final/               adapters, anchors, optimizer, method state (safetensors + JSON)
      summary.json         initial/final loss, restarts, wall time
      tensorboard/         when ``tensorboard`` is installed
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pesocli.config import RunConfig, save_config
from pesocli.errors import ConfigError


class RunFolder:
    """Owns the files of one run; appends JSONL records and flushes each line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._metrics = open(path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._restarts = open(path / "restarts.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tensorboard = _tensorboard_writer(path / "tensorboard")

    @classmethod
    def create(cls, cfg: RunConfig) -> RunFolder:
        path = cfg.run_dir
        if path.exists() and any(path.iterdir()):
            if not cfg.train.overwrite:
                raise ConfigError(f"run folder {path} exists; pass --overwrite or choose --run-name")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path / "config.yaml")
        return cls(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def log_metrics(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def log_restarts(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._restarts.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()
        self._restarts.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(path: Path):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
