"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits non-zero.

Library code raises these; it never calls ``sys.exit``. Exit codes: 2 for usage errors (click's code:
a bad option or value, a missing or unusable run folder, model or data file), 1 for failures while
working (disk, numerics), 3 for a path not built yet, 128 + N for signal N (130 for Ctrl-C).
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


class MissingRunError(PesoError):
    """A run folder argument that names nothing usable: no such folder, an empty one, no ``final/`` or no
    such checkpoint. A usage error, so exit 2 (as click's) in every command (train --resume, eval,
    export, merge, restart-inspect)."""

    exit_code = 2


class ModelError(PesoError):
    """A model that cannot be found or loaded."""

    exit_code = 2


class NotBuiltError(PesoError):
    """A path that exists in the design but is not implemented yet (named in an open issue)."""

    exit_code = 3


class StorageError(PesoError):
    """A file that cannot be written (disk full, no permission); nothing half-written is left behind."""

    exit_code = 1


class NumericalError(PesoError):
    """Training stopped on a non-finite loss or gradient, or a loss spike (``train.nan_policy``)."""

    exit_code = 1


class Interrupted(PesoError):
    """SIGINT or SIGTERM: the current step was finished and a full checkpoint written.

    ``exit_code`` is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as shells report it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
