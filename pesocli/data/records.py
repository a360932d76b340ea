"""Read records from JSONL / JSON / folders, detect their format and validate every one.

Every problem is a ``DataError`` whose message starts with where the record is: ``file:line``
(1-based line of a JSONL file) or ``file:[i]`` (0-based index into a JSON array).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pesocli.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
"""Roles of ``messages`` turns; only ``assistant`` turns are trained (``tool`` turns are context)."""
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"
}
"""ShareGPT ``from`` values -> chat roles."""
SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from."""

    where: str
    """``file:line`` (JSONL) or ``file:[index]`` (JSON array); every error message starts with it."""
    data: dict[str, Any]


def load_records(path: str | Path, format: str = "auto") -> tuple[list[Record], str]:
    """Read and validate all records of a file or folder; returns them and the (detected) format."""
    records = read_records(Path(path))
    if format == "auto":
        format = detect_format(records[0], RECORD_FORMATS)
    for record in records:
        check_record(record, format)
    return records, format


def read_records(path: Path) -> list[Record]:
    """All JSON objects of a file or of a folder's ``*.jsonl``/``*.json`` files (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .jsonl or .json files in this folder")
        return [record for f in files for record in _read_file(f)]
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return _read_file(path)


def _read_file(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if path.suffix == ".json":
        records = _read_json_array(path, text)
    else:
        records = _read_jsonl(path, text)
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        records.append(_as_record(f"{path}:{lineno}", obj))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json name
            return _read_jsonl(path, text)
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(obj, list):
        raise DataError(f"{path}:1: expected a JSON array of records (or JSON lines), got {_kind(obj)}")
    return [_as_record(f"{path}:[{i}]", item) for i, item in enumerate(obj)]


def _as_record(where: str, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    return Record(where=where, data=obj)


RECORD_FORMATS = ("text", "alpaca", "messages", "sharegpt", "prompt-completion")
"""Every format training reads, in detection order."""

_FORMAT_KEYS = {
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
}
"""The keys that identify each format (all of them must be present)."""


def detect_format(record: Record, formats: tuple[str, ...] | None = None) -> str:
    """The first of ``formats`` (default :data:`RECORD_FORMATS`, what training and ``peso eval`` read)
    whose keys the record has (see :data:`_FORMAT_KEYS`)."""
    formats = RECORD_FORMATS if formats is None else formats
    for name in formats:
        if all(key in record.data for key in _FORMAT_KEYS[name]):
            return name
    expected = [" and ".join(repr(k) for k in _FORMAT_KEYS[name]) for name in formats]
    raise DataError(
        f"{record.where}: cannot detect the data format from keys {sorted(record.data)}: expected "
        f"{', '.join(expected[:-1])}, or {expected[-1]} (or set data.format)"
    )


def check_record(record: Record, format: str) -> None:
    """Raise ``DataError`` (``where: reason``) if the record does not fit ``format``."""
    reason = _CHECKS[format](record.data)
    if reason:
        raise DataError(f"{record.where}: {reason} ({format} format)")


def _check_text(data: dict) -> str | None:
    return _string(data, "text", non_empty=True)


def _check_alpaca(data: dict) -> str | None:
    if data.get("input") is not None and not isinstance(data["input"], str):
        return f"'input' must be a string (got {_kind(data['input'])})"
    return _string(data, "instruction", non_empty=True) or _string(data, "output", non_empty=True)


def _check_messages(data: dict) -> str | None:
    """OpenAI-style turns: ``role`` and ``content``; an optional ``name``; ``tool`` turns and an
    assistant turn that only calls tools (``tool_calls``, empty or null ``content``) are context."""
    if "messages" not in data:
        return "missing key 'messages'"
    return _check_turns(data["messages"], "messages") or _needs_trained_turn(data["messages"], "messages")


def _check_turns(messages: Any, key: str) -> str | None:
    if not isinstance(messages, list):
        return f"{key!r} must be a list (got {_kind(messages)})"
    if not messages:
        return f"empty {key!r}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{key}[{i}] must be an object with 'role' and 'content' (got {_kind(m)})"
        if m.get("role") not in ROLES:
            return f"{key}[{i}]: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})"
        if m.get("name") is not None and not isinstance(m["name"], str):
            return f"{key}[{i}]: 'name' must be a string (got {_kind(m['name'])})"
        if m["role"] == "assistant" and m.get("tool_calls") and m.get("content") in (None, ""):
            continue  # a tool call only: rendered by the template, not trained
        reason = _string(m, "content", non_empty=m["role"] == "assistant")
        if reason:
            return f"{key}[{i}]: {reason}"
    return None


def _needs_trained_turn(messages: list[dict], key: str) -> str | None:
    if not any(m["role"] == "assistant" and m.get("content") for m in messages):
        return f"no assistant message in {key!r} (nothing to train on)"
    return None


def _check_sharegpt(data: dict) -> str | None:
    """``{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}]}``."""
    if "conversations" not in data:
        return "missing key 'conversations'"
    turns = data["conversations"]
    if not isinstance(turns, list):
        return f"'conversations' must be a list (got {_kind(turns)})"
    if not turns:
        return "empty 'conversations'"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"conversations[{i}] must be an object with 'from' and 'value' (got {_kind(turn)})"
        if turn.get("from") not in SHAREGPT_ROLES:
            return (f"conversations[{i}]: unknown 'from' {turn.get('from')!r} "
                    f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        reason = _string(turn, "value", non_empty=SHAREGPT_ROLES[turn["from"]] == "assistant")
        if reason:
            return f"conversations[{i}]: {reason}"
    if not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
        return "no 'gpt' turn in 'conversations' (nothing to train on)"
    return None


def _check_prompt_completion(data: dict) -> str | None:
    """TRL's ``{"prompt", "completion"}``: two strings, or two lists of chat turns (conversational)."""
    for key in ("prompt", "completion"):
        if key not in data:
            return f"missing key {key!r}"
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return _string(data, "completion", non_empty=True)
    if isinstance(prompt, list) and isinstance(completion, list):
        return (_check_turns(prompt, "prompt") or _check_turns(completion, "completion")
                or _needs_trained_turn(completion, "completion"))
    return (f"'prompt' and 'completion' must be two strings or two lists of turns "
            f"(got {_kind(prompt)} and {_kind(completion)})")


def _string(data: dict, key: str, non_empty: bool) -> str | None:
    if key not in data:
        return f"missing key {key!r}"
    if not isinstance(data[key], str):
        return f"{key!r} must be a string (got {_kind(data[key])})"
    if non_empty and not data[key].strip():
        return f"empty {key!r}"
    return None


def _kind(obj: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(obj), "a number")


_CHECKS = {
    "text": _check_text,
    "alpaca": _check_alpaca,
    "messages": _check_messages,
    "sharegpt": _check_sharegpt,
    "prompt-completion": _check_prompt_completion,
}
