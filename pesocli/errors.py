"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits non-zero.

Library code raises these; it never calls ``sys.exit``. ``exit_code`` 2 is click's usage-error code.
"""

from __future__ import annotations


class PesoError(Exception):
    """Base class: a problem the user can fix, reported as ``error: <message>``."""

    exit_code: int = 1


class ConfigError(PesoError):
    """A bad option, YAML key or value."""

    exit_code = 2


class DataError(PesoError):
    """A data file that cannot be read or a record that is malformed (message starts ``file:line:``)."""

    exit_code = 2


class ModelError(PesoError):
    """A model that cannot be found or loaded."""

    exit_code = 2


class NotBuiltError(PesoError):
    """A path that exists in the design but is not implemented yet (named in an open issue)."""

    exit_code = 3
