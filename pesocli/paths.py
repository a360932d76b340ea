"""Where peso's shipped files live: ``templates/`` (prompt and chat templates) and ``pesocli/assets``.

In a source checkout ``templates/`` sits next to ``pesocli/``; a wheel installs it as the package
``pesocli._templates``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def templates_dir() -> Path:
    """The ``templates`` folder (``prompts/*.json``, ``chat/*.jinja``)."""
    checkout = _PACKAGE_DIR.parent / "templates"
    if checkout.is_dir():
        return checkout
    return Path(str(importlib.resources.files("pesocli._templates")))


def assets_dir() -> Path:
    """``pesocli/assets``: the tiny tokenizer and the arithmetic data."""
    return _PACKAGE_DIR / "assets"


def default_train_data() -> Path:
    """The shipped arithmetic training set (alpaca JSONL, 1500 records)."""
    return assets_dir() / "data" / "arith_train.jsonl"


def default_eval_data() -> Path:
    """The shipped arithmetic eval set (alpaca JSONL, 200 records, disjoint from train)."""
    return assets_dir() / "data" / "arith_eval.jsonl"


def tiny_tokenizer_dir() -> Path:
    """The shipped tiny byte-level BPE tokenizer (load with ``AutoTokenizer.from_pretrained``)."""
    return assets_dir() / "tiny-tokenizer"
