"""Outputs appear complete or not at all: a temporary sibling folder, renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pesocli.errors import PesoError

SPACE_MARGIN = 1.05
"""Free space required: the estimated size times this, plus 64 MiB for tokenizer and JSON files."""


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Raise :class:`PesoError` when ``folder``'s file system has less than ``needed_bytes`` (with margin)."""
    needed = int(needed_bytes * SPACE_MARGIN) + 64 * 1024**2
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PesoError(f"not enough disk space in {folder}: the export needs about "
                        f"{needed / 1024**3:.2f} GiB, {free / 1024**3:.2f} GiB free")


@contextlib.contextmanager
def atomic_folder(target: Path, *, force: bool, needed_bytes: int) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``.

    An existing ``target`` is refused unless ``force``. On any error the temporary folder is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not force:
        raise PesoError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(target.parent, needed_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
