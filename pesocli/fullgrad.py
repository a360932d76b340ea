"""Full gradient without the full gradient (DESIGN.md).

A restart needs the top-r singular triplets of each adapted layer's full gradient
``G = dL/dW (out, in) = sum_tokens grad_out^T x``. The layer's backward already holds ``x`` and
``grad_out``, so every product with ``G`` is cheap: ``G @ Omega = grad_out^T (x @ Omega)`` and
``G^T Q = x^T (grad_out @ Q)``. :func:`estimate_full_gradients` runs a randomised range finder
(Halko, Martinsson & Tropp 2011, Alg. 4.4 with re-orthonormalisation) over the restart
micro-batches: one pass for ``Y = G Omega``, ``2 q`` passes of power iteration, and one pass
for ``B = Q^T G``; it keeps ``Q (out, k)`` and ``B (k, in)`` per layer, ``k = r + p``, so memory
is ``O((out + in) k)`` per layer and no ``out x in`` tensor is ever allocated.

Single pass (``fullgrad.single_pass``, on by default): when the restart's ``G`` comes from one
micro-batch in one process, a layer's backward holds all of ``G = grad_out^T x`` (as its two
factors) at once, so the whole range finder, power iterations included, runs inside that one
backward (:class:`_RangeFinderProbe`): the same products in the same order with the same test
matrix, so the same ``Q`` and ``B`` as ``2 q + 2`` passes, for the cost of one forward and
backward. With several micro-batches or processes the power iterations need the summed
products between passes, so the multi-pass path runs (also when a layer turns out to be called
more than once in the pass, e.g. a shared module).

Previous step (``fullgrad.source: previous-step``): the same in-backward range finder rides on the
backward of the training step just before a restart (:class:`StepSketch`, attached by
:meth:`pesocli.engine.Engine.training_step`), so a restart costs its SVDs only. Deviation from the
paper, which takes ``G_k`` at the restart point: this ``G`` is the gradient at the weights before
that step's optimizer update, on that step's batch (one update older). Where the step cannot
give it (several micro-batches or processes, a non-finite backward, a restart at step 0 or right
after a resume) the restart runs its own pass as with ``source: restart``.

The ``exact`` mode forms the dense ``G`` of one layer at a time (one pass per layer): the
reference the tests compare against, usable on small models.

Sketches are linear in ``G``: under ``torch.distributed`` each pass's products are summed with
one flattened all-reduce and every rank then computes the same small factorisations (the test
matrix comes from the same seed on every rank).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pesocli.dist import all_reduce_sum, is_distributed
from pesocli.layers import AdaptedLinear
from pesocli.linalg import canonical_signs


@dataclass(kw_only=True)
class FullGradConfig:
    """How restarts estimate the top-r singular triplets of each layer's full gradient."""

    mode: str = "sketch"
    """``sketch`` (randomised range finder in the layer backward) or ``exact`` (dense ``G``,
    one layer at a time; the reference, for small models)."""
    oversample: int = 8
    """Extra sketch columns ``p``: the sketch has ``r + p`` columns."""
    power_iters: int = 2
    """Power iterations ``q``; each costs two passes over the restart micro-batches."""
    batches: int = 1
    """Number of training micro-batches the full gradient is averaged over."""
    seed: int = 1234
    """Seed of the random test matrix (same on every rank)."""
    single_pass: bool = True
    """Run the whole range finder inside one backward when ``batches`` is 1 in one process
    (same result as ``2 q + 2`` passes, a restart then costs one forward + backward)."""
    source: str = "restart"
    """``restart``: the restart's own forward + backward at the current weights (the paper's
    ``G_k``). ``previous-step``: reuse the backward of the training step before the restart (``G``
    one optimizer update older; a restart then costs no forward/backward; sketch mode only)."""

    def validate(self) -> list[str]:
        errors = []
        if self.mode not in ("sketch", "exact"):
            errors.append(f"fullgrad.mode must be sketch or exact (got {self.mode!r})")
        if self.oversample < 0:
            errors.append(f"fullgrad.oversample must be >= 0 (got {self.oversample})")
        if self.power_iters < 0:
            errors.append(f"fullgrad.power_iters must be >= 0 (got {self.power_iters})")
        if self.batches < 1:
            errors.append(f"fullgrad.batches must be >= 1 (got {self.batches})")
        if self.source not in ("restart", "previous-step"):
            errors.append(f"fullgrad.source must be restart or previous-step (got {self.source!r})")
        elif self.source == "previous-step" and self.mode != "sketch":
            errors.append("fullgrad.source: previous-step needs fullgrad.mode: sketch")
        return errors


class GradientEstimate(ABC):
    """A layer's full gradient ``G (out, in)``, exact or as a sketch ``G ~ Q B``."""

    @abstractmethod
    def top_r(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top singular triplets of ``G``: ``U (out, r)``, ``S (r,)``, ``V (in, r)``."""

    @abstractmethod
    def project(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``left^T G right`` for ``left (out, a)``, ``right (in, b)``: an ``(a, b)`` matrix."""

    @property
    @abstractmethod
    def total_energy(self) -> float:
        """``||G||_F^2`` (exact), or ``||Q^T G||_F^2`` for a sketch (the sketched total)."""

    def captured_energy(self, rank: int) -> float:
        """Share of the (sketched) total energy in the top-r subspace."""
        _, s, _ = self.top_r(rank)
        total = self.total_energy
        return float(s.pow(2).sum() / total) if total > 0 else 0.0


class DenseGradient(GradientEstimate):
    """The exact ``G (out, in)``."""

    def __init__(self, gradient: torch.Tensor) -> None:
        self.gradient = gradient

    def top_r(self, rank):
        u, s, vh = torch.linalg.svd(self.gradient, full_matrices=False)
        u, v = canonical_signs(u[:, :rank], vh[:rank].T)
        return u, s[:rank], v

    def project(self, left, right):
        return left.T @ self.gradient @ right

    @property
    def total_energy(self) -> float:
        return float(self.gradient.pow(2).sum())


class SketchedGradient(GradientEstimate):
    """``G ~ Q B`` with ``Q (out, k)`` orthonormal and ``B = Q^T G (k, in)``."""

    def __init__(self, basis: torch.Tensor, coefficients: torch.Tensor) -> None:
        self.basis = basis
        self.coefficients = coefficients
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def top_r(self, rank):
        if self._svd is None:
            u, s, vh = torch.linalg.svd(self.coefficients, full_matrices=False)
            u, v = canonical_signs(self.basis @ u, vh.T)
            self._svd = (u, s, v)
        u, s, v = self._svd
        return u[:, :rank], s[:rank], v[:, :rank]

    def project(self, left, right):
        return (left.T @ self.basis) @ (self.coefficients @ right)

    @property
    def total_energy(self) -> float:
        return float(self.coefficients.pow(2).sum())


class _ProductProbe:
    """Accumulates one product with ``G`` during a backward pass (FP32).

    ``side="right"``: ``acc (out, k) += grad_out^T (x @ test)`` with ``test (in, k)`` = ``G test``.
    ``side="left"``: ``acc (in, k) += x^T (grad_out @ test)`` with ``test (out, k)`` = ``G^T test``.
    ``side="dense"``: ``acc (out, in) += grad_out^T x`` (the exact reference).
    """

    def __init__(self, side: str, test: torch.Tensor | None, shape: tuple[int, int], device) -> None:
        self.side = side
        self.test = test
        self.acc = torch.zeros(shape, dtype=torch.float32, device=device)

    def observe(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
        if self.side == "right":
            self.acc.addmm_(g2.T, x2 @ self.test)
        elif self.side == "left":
            self.acc.addmm_(x2.T, g2 @ self.test)
        else:
            self.acc.addmm_(g2.T, x2)


class _RangeFinderProbe:
    """The whole range finder on one micro-batch's ``G = grad_out^T x``, inside its backward.

    Same products, order and test matrix as the multi-pass path (:func:`_sketch`), so the same
    ``Q (out, k)`` and ``G^T Q (in, k)``; temporaries are ``O(tokens k + (out + in) k)``.
    ``calls`` counts the layer's backward visits: more than one means the products of several
    visits would have to be summed first, and the caller falls back to the multi-pass path.
    """

    def __init__(self, test: torch.Tensor, power_iters: int) -> None:
        self.test = test
        self.power_iters = power_iters
        self.calls = 0
        self.basis: torch.Tensor | None = None
        self.coefficients_t: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            return
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
        basis = _orthonormalize(g2.T @ (x2 @ self.test))  # orth(G Omega)
        for _ in range(self.power_iters):
            row_basis = _orthonormalize(x2.T @ (g2 @ basis))  # orth(G^T Q)
            basis = _orthonormalize(g2.T @ (x2 @ row_basis))  # orth(G P)
        self.basis = basis
        self.coefficients_t = x2.T @ (g2 @ basis)  # G^T Q = (Q^T G)^T


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum one pass's products over the processes: one flattened all-reduce (a no-op in one process).

    A sum, not an average: the trainer divides each process's token-loss sum by the trained tokens
    of *all* processes, so each process's ``G`` is its share of the global ``G`` and the shares add
    up to the 1-process ``G`` exactly.
    """
    all_reduce_sum(tensors)


def _orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix)[0]


def _pass(
    layers: dict[str, AdaptedLinear],
    probes: dict[str, _ProductProbe | _RangeFinderProbe],
    run_pass: Callable[[], None],
) -> dict[str, torch.Tensor]:
    """Run ``run_pass`` with ``probes`` attached; the summed products of the ``_ProductProbe`` s."""
    for name, probe in probes.items():
        layers[name].probe = probe
    try:
        run_pass()
    finally:
        for name in probes:
            layers[name].probe = None
    results = {name: probe.acc for name, probe in probes.items() if isinstance(probe, _ProductProbe)}
    _all_reduce(list(results.values()))
    return results


class _GradStash:
    """Keeps the trainable parameters' ``.grad`` aside while restart passes run."""

    def __init__(self, layers: dict[str, AdaptedLinear]) -> None:
        self.params = [p for layer in layers.values() for p in layer.delta.parameters()]
        self.saved: list[torch.Tensor | None] = []

    def __enter__(self) -> _GradStash:
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def clear(self) -> None:
        for p in self.params:
            p.grad = None

    def __exit__(self, *exc) -> None:
        for p, grad in zip(self.params, self.saved, strict=True):
            p.grad = grad


def estimate_full_gradients(
    layers: dict[str, AdaptedLinear], run_pass: Callable[[], None], rank: int, config: FullGradConfig
) -> dict[str, GradientEstimate]:
    """Estimate every layer's full gradient from ``run_pass``.

    ``run_pass()`` must run forward and backward over the restart micro-batches (the loss it
    backpropagates defines ``G``); it is called once (sketch, ``single_pass`` with one
    micro-batch in one process), ``2 q + 2`` times (sketch otherwise) or once per layer (exact). The adapters'
    ``.grad`` are restored afterwards, untouched.
    """
    with _GradStash(layers) as stash:

        def one_pass(probes: dict[str, _ProductProbe]) -> dict[str, torch.Tensor]:
            out = _pass(layers, probes, run_pass)
            stash.clear()
            return out

        if config.mode == "exact":
            return {
                name: DenseGradient(
                    one_pass(
                        {
                            name: _ProductProbe(
                                "dense", None, (layer.out_features, layer.in_features), layer.anchor.up.device
                            )
                        }
                    )[name]
                )
                for name, layer in layers.items()
            }
        return _sketch(layers, one_pass, rank, config)


def _test_matrices(
    layers: dict[str, AdaptedLinear], rank: int, config: FullGradConfig
) -> dict[str, torch.Tensor]:
    """Gaussian ``Omega (in, r + p)`` per layer, from ``config.seed`` (the same on every rank)."""
    generator = torch.Generator().manual_seed(config.seed)
    return {
        name: torch.randn(
            layer.in_features, min(rank + config.oversample, layer.out_features, layer.in_features),
            generator=generator,
        ).to(layer.anchor.up.device)
        for name, layer in layers.items()
    }


def _sketch(
    layers: dict[str, AdaptedLinear], one_pass, rank: int, config: FullGradConfig
) -> dict[str, GradientEstimate]:
    device = {name: layer.anchor.up.device for name, layer in layers.items()}
    tests = _test_matrices(layers, rank, config)

    def right(test: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # G @ test
        return one_pass(
            {
                n: _ProductProbe("right", t, (layers[n].out_features, t.shape[1]), device[n])
                for n, t in test.items()
            }
        )

    def left(test: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # G^T @ test
        return one_pass(
            {
                n: _ProductProbe("left", t, (layers[n].in_features, t.shape[1]), device[n])
                for n, t in test.items()
            }
        )

    if config.single_pass and config.batches == 1 and not is_distributed():
        single = _single_pass(layers, one_pass, tests, config.power_iters)
        if single is not None:
            return single
    basis = {n: _orthonormalize(y) for n, y in right(tests).items()}
    for _ in range(config.power_iters):
        row_basis = {n: _orthonormalize(z) for n, z in left(basis).items()}
        basis = {n: _orthonormalize(y) for n, y in right(row_basis).items()}
    coefficients = left(basis)  # G^T Q = (Q^T G)^T
    return {n: SketchedGradient(basis[n], coefficients[n].T.contiguous()) for n in layers}


def _single_pass(
    layers: dict[str, AdaptedLinear], one_pass, tests: dict[str, torch.Tensor], power_iters: int
) -> dict[str, GradientEstimate] | None:
    """The range finder inside one backward; ``None`` when a layer was visited other than once."""
    probes = {n: _RangeFinderProbe(t, power_iters) for n, t in tests.items()}
    one_pass(probes)
    return _estimates_of(probes)


def _estimates_of(probes: dict[str, _RangeFinderProbe]) -> dict[str, GradientEstimate] | None:
    if any(p.calls != 1 for p in probes.values()):
        return None
    return {n: SketchedGradient(p.basis, p.coefficients_t.T.contiguous()) for n, p in probes.items()}


class StepSketch:
    """The in-backward range finder on a training step's backward (``fullgrad.source: previous-step``).

    :attr:`probes` are attached to the layers for that step; :meth:`estimates` then gives the same
    sketch a restart pass over that step's batch would have given, or ``None`` when the step cannot
    provide it (a layer seen other than once: several micro-batches or a shared module; non-finite
    numbers; several processes, where ``G`` is a sum over ranks).
    """

    def __init__(self, layers: dict[str, AdaptedLinear], rank: int, config: FullGradConfig) -> None:
        self.usable = not is_distributed()
        tests = _test_matrices(layers, rank, config) if self.usable else {}
        self.probes = {n: _RangeFinderProbe(t, config.power_iters) for n, t in tests.items()}

    def estimates(self) -> dict[str, GradientEstimate] | None:
        found = _estimates_of(self.probes) if self.usable else None
        if found is None:
            return None
        finite = all(
            bool(torch.isfinite(e.basis).all() and torch.isfinite(e.coefficients).all())
            for e in found.values()
        )
        return found if finite else None
