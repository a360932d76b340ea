"""The import layering: the library's low modules never import the trainer, the config or the methods."""

from __future__ import annotations

import pytest


def test_the_trainer_builds_on_the_same_collectives() -> None:
    import pesocli.dist as dist
    from pesocli.train import distributed

    assert distributed.all_reduce_sum is dist.all_reduce_sum
    assert distributed.ProcessGroupError is dist.ProcessGroupError
    assert distributed.share(10, 1, 3) == dist.share(10, 1, 3) == slice(3, 6)


@pytest.mark.parametrize("path", ["pesocli/fullgrad.py", "pesocli/dist.py", "pesocli/layers.py"])
def test_low_modules_name_no_trainer_even_inside_functions(path: str) -> None:
    """Every import statement, also the lazy ones inside functions (what closed the import circle)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / path).read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    upper = ("pesocli.train", "pesocli.config", "pesocli.methods", "pesocli.engine", "pesocli.cli")
    assert not [name for name in names if name.startswith(upper)]
