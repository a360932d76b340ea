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
