"""``peso_export.json``: what an export holds, where it came from, and the sha256 of every file.

Written last, into the export's root. ``parts`` names the folders the checker validates, relative
to the root: ``model`` (a model folder), ``adapter`` (a PEFT folder) and ``adapter_base`` (the model
folder the adapter applies to) or ``adapter_base_external`` (a folder or Hugging Face id outside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pesocli import __version__
from pesocli.hashing import sha256

MANIFEST = "peso_export.json"

__all__ = ["MANIFEST", "file_hashes", "sha256", "write_manifest"]


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except the manifest, sorted."""
    return {
        str(path.relative_to(root)): sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/peso_export.json`` = ``info`` + peso version + file hashes; returns what was written."""
    manifest = {**info, "peso_version": __version__, "files": file_hashes(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
