"""What every ``peso`` subcommand shares: error reporting, config-backed options, version report.

Nothing here imports torch or transformers: ``peso --help`` must stay instant.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pesocli.errors import Interrupted, PesoError

F = TypeVar("F", bound=Callable[..., Any])

VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "transformers", "peft", "bitsandbytes")
"""Distributions whose versions ``peso --version`` reports (for bug reports)."""


def debug_enabled() -> bool:
    """``--debug`` on the group, or ``PESO_DEBUG=1`` in the environment: show tracebacks."""
    if os.environ.get("PESO_DEBUG", "") not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def run_command(fn: F) -> F:
    """Wrap a command body: a :class:`PesoError` becomes ``error: <message>`` on stderr and its
    ``exit_code``; Ctrl-C exits 130. Tracebacks only with ``--debug`` or ``PESO_DEBUG=1``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (PesoError, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            sys.exit(report_failure(exc))

    return wrapper  # type: ignore[return-value]


def report_failure(exc: BaseException) -> int:
    """Print what ``peso`` prints when ``exc`` ends a command; return the exit code it ends with.

    A :class:`PesoError` is ``error: <message>`` (its ``exit_code``), the trainer's checkpointed stop on
    SIGINT/SIGTERM ``interrupted: <message>`` (130/143), a bare Ctrl-C ``interrupted`` (130),
    both as tracebacks under ``--debug``; anything else is a bug and shows its traceback (1). A
    ``SystemExit`` keeps its code (a text code is printed and exits 1, as Python does).
    """
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(str(exc.code), err=True)  # as Python itself does with sys.exit("message")
        return 1
    code = exc.exit_code if isinstance(exc, PesoError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
    if debug_enabled() or not isinstance(exc, (PesoError, KeyboardInterrupt)):
        traceback.print_exception(exc, file=sys.stderr)
    else:
        if isinstance(exc, Interrupted):  # asked for, not a failure: what was saved and how to go on
            click.echo(f"interrupted: {exc}", err=True)
        else:
            click.echo(f"error: {exc}" if isinstance(exc, PesoError) else "interrupted", err=True)
    return code


class ConfigOption(click.Option):
    """An option that sets one dotted config key; its help ends with ``[config: key; default: X]``.

    The default is read from the config dataclasses only when help is shown (so it is never
    written twice, and defining the option imports nothing heavy).
    """

    def __init__(self, *args: Any, config_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_key = config_key

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        from pesocli.config import describe_default

        names, text = record
        return names, f"{text} [config: {self.config_key}; default: {describe_default(self.config_key)}]"


def config_option(*decls: str, key: str, help: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` for a :class:`ConfigOption` that sets ``key``; ``None``/unset means "not given"."""
    kwargs.setdefault("default", None)
    return click.option(*decls, cls=ConfigOption, config_key=key, help=help, **kwargs)


def parse_settings(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """Click callback for ``--set KEY=VALUE`` (repeatable): a dict of dotted keys to raw strings."""
    settings: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}", ctx, param)
        settings[key.strip()] = value.strip()
    return settings


def version_report(peso_version: str) -> str:
    """``peso X`` followed by the versions of torch, transformers, peft, bitsandbytes and python."""
    lines = [f"peso {peso_version}"]
    for dist in VERSIONED_PACKAGES:
        try:
            lines.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    lines.append(f"python {platform.python_version()}")
    return "\n".join(lines)
