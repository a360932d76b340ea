"""Read a run folder's logs as they are on disk, also while ``peso train`` is still writing them.

``metrics.jsonl`` and ``restarts.jsonl`` are appended one flushed line at a time, so a reader can
only ever see one incomplete line: the last one, without its newline. It is skipped (and counted);
a broken line anywhere else is a real error and is reported as ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pesocli.errors import MissingRunError, PesoError

RESTARTS_VERSION = 2
"""``version`` of the ``restarts.jsonl`` records this peso writes. Version 2: ``step`` is 1-based, the
step the restart ran before, as in the progress bar and ``metrics.jsonl`` (a restart before the first
step is step 1). Records without ``version`` (older run folders) counted from 0: the same restart was
step 0. :func:`restart_step` reads both."""


def restart_step(record: dict[str, Any]) -> int:
    """The 1-based step a ``restarts.jsonl`` record's restart ran before, for every record version."""
    return int(record["step"]) + (0 if int(record.get("version", 1)) >= 2 else 1)


@dataclass
class RunLog:
    """What a run folder holds so far (nothing here needs torch)."""

    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Training records of ``metrics.jsonl`` (those with a ``loss``), in file order."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """``{step, eval_loss}`` records of ``metrics.jsonl``."""
    restarts: list[dict[str, Any]] = field(default_factory=list)
    """Lines of ``restarts.jsonl``: one ``RestartRecord`` per restart and layer (+ ``seconds_total``),
    their ``step`` 1-based whatever the file's version (:func:`restart_step`)."""
    complete: bool = False
    """``final/`` exists: training finished."""
    skipped_lines: int = 0
    """Incomplete last lines left out (a run still being written)."""

    config_method: str | None = None
    """``method.name`` of ``config.yaml`` (``None`` when unreadable)."""

    @property
    def method(self) -> str | None:
        """The method named by the restart records, else by ``config.yaml``."""
        return self.restarts[0].get("method", self.config_method) if self.restarts else self.config_method

    @property
    def layer_names(self) -> list[str]:
        """Adapted layers that appear in the restart records, in first-seen order."""
        return list(dict.fromkeys(r["layer"] for r in self.restarts))


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of ``path`` and how many incomplete trailing lines were skipped (0 or 1).

    A missing file is empty. Raises :class:`PesoError` (``file:line: ...``) for a broken line that
    is not the unterminated last one.
    """
    if not path.is_file():
        return [], 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records, skipped = [], 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # unterminated last line: being written right now
                skipped += 1
                continue
            raise PesoError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
        if isinstance(obj, dict):
            records.append(obj)
    return records, skipped


def read_run_log(path: str | Path) -> RunLog:
    """Read ``metrics.jsonl``, ``restarts.jsonl`` and whether ``final/`` exists.

    Raises :class:`PesoError` when ``path`` is not a run folder (no ``config.yaml`` and no logs).
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingRunError(f"run folder {path} does not exist")
    markers = ("config.yaml", "metrics.jsonl", "restarts.jsonl")
    if not any((path / name).is_file() for name in markers):
        raise MissingRunError(
            f"{path} is not a peso run folder (no config.yaml, metrics.jsonl or restarts.jsonl)"
        )
    metrics, skipped_m = read_jsonl(path / "metrics.jsonl")
    restarts, skipped_r = read_jsonl(path / "restarts.jsonl")
    restarts = [{**r, "step": restart_step(r)} for r in restarts if "step" in r and "layer" in r]
    return RunLog(
        path=path,
        metrics=[m for m in metrics if "loss" in m and "step" in m],
        evals=[m for m in metrics if "eval_loss" in m and "step" in m],
        restarts=restarts,
        complete=(path / "final").is_dir(),
        skipped_lines=skipped_m + skipped_r,
        config_method=_config_method(path / "config.yaml"),
    )


def _config_method(path: Path) -> str | None:
    import yaml

    try:
        method = (yaml.safe_load(path.read_text()) or {}).get("method") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    name = method.get("name") if isinstance(method, dict) else None
    return str(name) if name is not None else None
