"""No pickle anywhere: state is safetensors + JSON, and nothing loads pickles.

An AST check over every Python file of the repository (``pesocli/``, ``scripts/``, ``tests/``):
no import of ``pickle``/``dill``/``cloudpickle``/``joblib``/``shelve``/``marshal``, no
``torch.save`` (tensors go to safetensors, everything else to JSON), no ``torch.load`` without
``weights_only=True``, no ``numpy.load(..., allow_pickle=True)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> list[Path]:
    return sorted(p for folder in ("pesocli", "scripts", "tests") for p in (REPO / folder).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def problems(source: str, where: str) -> list[str]:
    """Every pickle use in ``source`` (``where:line: what``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.save"):
                found.append(f"{where}:{node.lineno}: torch.save (use safetensors / JSON)")
            elif name.endswith("torch.load"):
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")):
                flag = _keyword(node, "allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}:{node.lineno}: numpy.load with allow_pickle")
    return found


def test_no_module_uses_pickle() -> None:
    sources = _sources()
    assert len(sources) > 20
    found = [p for path in sources for p in problems(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "code",
    ["import pickle", "from pickle import dumps", "import dill as d", "torch.save(model.state_dict(), 'p')",
     "torch.load('p')", "torch.load('p', weights_only=False)", "np.load('x.npy', allow_pickle=True)"],
)  # fmt: skip
def test_the_check_catches_each_pickle_use(code: str) -> None:
    assert problems(code, "x.py")


def test_the_check_allows_the_safe_forms() -> None:
    assert not problems("torch.load('x.pt', weights_only=True)\nnp.load('x.npy')\nsave_file(t, 'x')", "x.py")
