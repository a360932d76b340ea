"""A small Appendix A (``n = 32, r = 4``): rank-r methods stall at ``a^2``, peso-r goes far below.

The full-size run is ``scripts/synthetic_appendix_a.py`` (``n = 64``, ratio <= 1e-6 required).
"""

from __future__ import annotations

import pytest

from pesocli.synthetic import SyntheticProblem, run

A = 10.0
SMALL = SyntheticProblem(n=32, rank=4, a=A, steps=1000)  # K and lr: the problem's defaults


@pytest.fixture(scope="module")
def lora_final() -> float:
    return run("lora", SMALL)[-1]


def test_lora_stalls_at_a_squared(lora_final):
    assert lora_final == pytest.approx(A**2, rel=1e-3)


def test_lora_one_stalls_too():
    losses = run("lora-one", SMALL)
    assert losses[-1] == pytest.approx(A**2, rel=1e-3)
    assert losses[0] < (SMALL.rank + 1) * A**2  # the step-0 init already moved along the top-r of -G


def test_peso_r_default_goes_far_below_lora(lora_final):
    losses = run("peso-r", SMALL)
    assert len(losses) == SMALL.steps + 1
    assert losses[-1] < 1e-3 * lora_final
    assert min(losses) < 1e-3 * A**2


def test_peso_r_paper_anchor_update_also_escapes_at_its_k(lora_final):
    """``paper`` needs a longer restart period than ``continuous`` (docs/BENCHMARKS.md)."""
    problem = SyntheticProblem(n=32, rank=4, a=A, steps=1000, restart_every=20)
    assert run("peso-r", problem, anchor_update="paper")[-1] < 1e-3 * lora_final
