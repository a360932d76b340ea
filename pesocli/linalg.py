"""Small dense linear algebra used by restarts: bases, alignment, exact low-rank SVDs.

Everything here works on thin matrices (one side at most ``r + p`` wide) in FP32; nothing
forms an ``out x in`` product unless a docstring says so.
"""

from __future__ import annotations

import math

import torch


def orthonormal_basis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR ``matrix (m, k) = Q R`` with ``diag(R) >= 0`` (a unique, sign-stable basis)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs, r * signs[:, None]


def canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular-vector pairs so each column of ``u`` has its largest-magnitude entry positive.

    ``u (m, k)``, ``v (n, k)``; ``u diag(s) v^T`` is unchanged. LAPACK's signs can flip under
    rounding noise (e.g. the same gradient summed on 1 or 2 processes); a fixed convention keeps
    restarts, which rotate optimizer state by these bases, on the same path.
    """
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def procrustes_align(basis: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rotate ``basis (m, r)`` to best match ``target (m, r)``: returns ``basis @ R_U^T``.

    Appendix D.1: ``target^T basis = P Sigma Q^T``, ``R_U = P Q^T`` solves
    ``min_R ||basis R - target||_F`` over orthogonal ``R`` (``R = R_U^T``).
    """
    p, _, qh = torch.linalg.svd(target.T @ basis)
    return basis @ (p @ qh).T


def balanced_split(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``core (r, r) = R_L Sigma R_R^T`` into ``(R_L Sigma^1/2, Sigma^1/2 R_R^T)``."""
    left, sigma, right_h = torch.linalg.svd(core)
    root = sigma.clamp_min(0).sqrt()
    return left * root, root[:, None] * right_h


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD of ``up (out, k) @ down (k, in)`` without forming it.

    QR of both factors and an SVD of the ``k x k`` core; returns ``U (out, k)``, ``S (k,)``,
    ``Vh (k, in)`` with ``up @ down = U diag(S) Vh``.
    """
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u_core, s, (q_down @ vh_core.T).T


def principal_angles_deg(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of ``first`` and ``second``."""
    q1, _ = torch.linalg.qr(first.double())  # FP64: arccos of FP32 cosines cannot resolve < ~0.03 deg
    q2, _ = torch.linalg.qr(second.double())
    cosines = torch.linalg.svdvals(q1.T @ q2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).flip(0).to(first.dtype)


def rms(tensor: torch.Tensor) -> float:
    """Root-mean-square of all entries (the paper's ``||.||`` in Appendix D.2)."""
    return float(tensor.float().pow(2).mean().sqrt())


def cosine_ramp(start: float, end: float, position: float, window: float) -> float:
    """``start + (end - start) (1 - cos(pi t / T)) / 2`` for ``t`` in ``[0, T]``; ``end`` after."""
    if window <= 0 or position >= window:
        return end
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * max(position, 0.0) / window))


# ------------------------------------------------------------------------------------------------
# LoRSum (OPLoRA): proximal alternating least squares on thin products only.
#
# Orientation: paper factors ``up = A (out, r)``, ``down = B (r, in)``, ``Delta W = up @ down``.
# A matrix ``X (out, in)`` enters only through ``X @ R`` (``R (in, k)``) and ``L^T @ X``
# (``L (out, k)``); a full gradient ``G = sum_tokens grad_out^T x`` is one such operator.


class ThinProducts:
    """A matrix ``X (out, in)`` known only through its products with thin matrices."""

    def right(self, mat: torch.Tensor) -> torch.Tensor:
        """``X @ mat`` for ``mat (in, k)``: an ``(out, k)`` matrix."""
        raise NotImplementedError

    def left(self, mat: torch.Tensor) -> torch.Tensor:
        """``mat^T @ X`` for ``mat (out, k)``: a ``(k, in)`` matrix."""
        raise NotImplementedError


class LowRankProducts(ThinProducts):
    """``X = up (out, k) @ down (k, in)``, never formed."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor) -> None:
        self.up, self.down = up, down

    def right(self, mat):
        return self.up @ (self.down @ mat)

    def left(self, mat):
        return (mat.T @ self.up) @ self.down


class TokenGradient(ThinProducts):
    """``G = sum_i grad_out_i^T x_i (out, in)`` from saved token rows, never formed (FP32 products).

    ``inputs[i] (t_i, in)`` and ``grad_outputs[i] (t_i, out)`` are one micro-batch's layer input
    and output gradient, in any dtype; each product costs ``O(t (in + out) k)``.
    """

    def __init__(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> None:
        self.inputs, self.grad_outputs = inputs, grad_outputs

    def right(self, mat):
        out = None
        for x, g in zip(self.inputs, self.grad_outputs, strict=True):
            part = g.float().T @ (x.float() @ mat)
            out = part if out is None else out.add_(part)
        return out

    def left(self, mat):
        out = None
        for x, g in zip(self.inputs, self.grad_outputs, strict=True):
            part = (g.float() @ mat).T @ x.float()
            out = part if out is None else out.add_(part)
        return out


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ X = rhs`` for a small symmetric positive (semi)definite ``matrix`` (FP32).

    Cholesky first; a singular matrix gets a relative jitter, then a least-squares solve. A
    non-finite ``matrix`` gives a NaN solution (the caller reports the divergence).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    if not bool(torch.isfinite(matrix).all()):  # diverged upstream: propagate, LAPACK would abort
        return torch.full_like(rhs, float("nan"))
    jitter = 1e-6 * max(float(torch.diagonal(matrix).abs().max()), 1e-12)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(matrix + jitter * eye)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(matrix, rhs).solution


def low_rank_sum(
    start: tuple[torch.Tensor, torch.Tensor],
    start_coefficient: float,
    terms: list[tuple[float, ThinProducts]],
    *,
    sweeps: int = 1,
    lam: float = 0.0,
    metrics: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRSum: a rank-r pair ``(up', down')`` with ``up' @ down' ~ T``, by proximal ALS.

    ``T = c0 * up0 @ down0 + sum_j c_j X_j`` with ``start = (up0 (out, r), down0 (r, in))``,
    ``c0 = start_coefficient`` and ``terms = [(c_j, X_j)]``. ``start`` is also the ALS start and
    the proximal centre: each half-step solves one block of
    ``min ||up' down' - T||^2 + lam (||up' - up0||^2 + ||down' - down0||^2)`` exactly,
    ``down' <- (up'^T up' + lam I)^-1 (lam down0 + up'^T T)``, then
    ``up' <- (lam up0 + T down'^T)(down' down'^T + lam I)^-1`` (one sweep = both; ``down`` first,
    as PSI-LoRA's ``low_rank_sum``). ``sweeps = 0`` is the Jacobi variant: both blocks from
    ``start`` (one preconditioned step, needing products of each ``X_j`` with ``start`` only).

    ``metrics = (m_out (out,), m_in (in,))``, positive diagonals, switch to the scaled variant:
    the fit is measured in ``||M_out^1/2 (.) M_in^1/2||_F`` and every ``X_j`` is preconditioned,
    ``T = c0 up0 down0 + sum_j c_j M_out^-1 X_j M_in^-1`` (PSI-LoRA's ``scaled_low_rank_sum``).
    Only ``r x r`` systems are solved and no ``out x in`` tensor is formed. FP32 throughout.
    """
    up0, down0 = start[0].float(), start[1].float()
    rank = up0.shape[1]
    eye = torch.eye(rank, dtype=up0.dtype, device=up0.device)
    m_out, m_in = (None, None) if metrics is None else (metrics[0].float(), metrics[1].float())
    up, down = up0, down0
    for half in range(max(2 * sweeps, 2)):
        basis_up = up0 if sweeps == 0 else up
        basis_down = down0 if sweeps == 0 else down
        if half % 2 == 0:  # down' given up (the paper's B; PEFT lora_A)
            weighted = basis_up if m_out is None else basis_up * m_out[:, None]
            rhs = lam * down0 + start_coefficient * (weighted.T @ up0) @ down0
            for coefficient, term in terms:
                product = term.left(basis_up)
                rhs = rhs + coefficient * (product if m_in is None else product / m_in)
            down = spd_solve(weighted.T @ basis_up + lam * eye, rhs)
        else:  # up' given down (the paper's A; PEFT lora_B)
            weighted = basis_down if m_in is None else basis_down * m_in
            rhs = lam * up0 + start_coefficient * up0 @ (down0 @ weighted.T)
            for coefficient, term in terms:
                product = term.right(basis_down.T)
                rhs = rhs + coefficient * (product if m_out is None else product / m_out[:, None])
            up = spd_solve(basis_down @ weighted.T + lam * eye, rhs.T).T
    return up, down
