"""Pure linear algebra shared by the methods. All inputs and outputs are float64 tensors.

Conventions (METHODS.md §0): a weight ``W`` is (out, in); a rank-``r`` factorisation returns
``A``: (r, in) and ``B``: (out, r) with ``W ≈ B @ A``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Guard:
    """A regulariser that had to be added to make a decomposition succeed (reported to the user)."""

    kind: str
    value: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


def split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors of ``U diag(S) Vh`` with ``Σ^½`` on each side.

    U: (out, k), S: (k,), Vh: (k, in) -> A: (r, in), B: (out, r).
    """
    s = S[:r].clamp_min(0).sqrt()
    return s[:, None] * Vh[:r], U[:, :r] * s[None, :]


def svd_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)``. W: (out, in) -> A: (r, in), B: (out, r)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return split_sqrt(U, S, Vh, r)


def asvd_factors(
    W: torch.Tensor, abs_mean: torch.Tensor, r: int, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: SVD of ``W S`` with ``S = diag(mean|x|)^α``; ``A = Σ_r^½ V_rᵀ S⁻¹``.

    W: (out, in), abs_mean: (in,) -> A: (r, in), B: (out, r). Channels that never fire get the
    smallest positive scale (floor 1e-6 of the largest) so ``S⁻¹`` stays finite.
    """
    s = abs_mean.clamp_min(0).pow(alpha)
    s = s.clamp_min(max(s.max().item(), 1e-30) * 1e-6)
    A, B = svd_factors(W * s[None, :], r)
    return A / s[None, :], B


def guarded_cholesky(C: torch.Tensor, start: float = 1e-6, tries: int = 12) -> tuple[torch.Tensor, Guard]:
    """Lower Cholesky factor of ``C + δI``, δ growing ×10 from ``start·mean diag(C)`` until it works.

    C: (n, n) symmetric PSD -> L: (n, n) lower triangular, and the δ used.
    """
    scale = C.diagonal().mean().abs().item() or 1.0
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    delta = start * scale
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(C + delta * eye)
        if info.item() == 0:
            return L, Guard("cholesky_ridge", delta)
        delta *= 10.0
    raise FloatingPointError(f"Cholesky failed even with ridge {delta:.3g}: the statistics contain NaN or Inf")


def whitened_svd_factors(W: torch.Tensor, C: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, Guard]:
    """SVD-LLM: ``L = chol(C + δI)``; SVD of ``W L``; ``A = Σ_r^½ V_rᵀ L⁻¹``, ``B = U_r Σ_r^½``.

    W: (out, in), C: (in, in) input second moment -> A: (r, in), B: (out, r), guard.
    Minimises ``‖(W − BA) X‖`` over the calibration inputs, since ``C = X Xᵀ / n``.
    """
    L, guard = guarded_cholesky(C)
    A_w, B = svd_factors(W @ L, r)
    A = torch.linalg.solve_triangular(L, A_w, upper=False, left=False)
    return A, B, guard


def guarded_eigh(
    S: torch.Tensor, vectors: bool = True, warn_at: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor | None, Guard | None]:
    """Eigen-pairs of a symmetric PSD matrix in descending order, negative eigenvalues clamped to 0.

    S: (d, d) -> eigenvalues (d,), eigenvectors (d, d) as columns (None unless ``vectors``), and a
    guard when an eigenvalue below ``-1e-10·max`` had to be clamped (value: the most negative
    eigenvalue over the largest); rounding noise below that is clamped silently. Raises on NaN/Inf.
    """
    if not torch.isfinite(S).all():
        raise FloatingPointError("statistics matrix contains NaN or Inf")
    S = (S + S.T) / 2
    if vectors:
        evals, evecs = torch.linalg.eigh(S)
        evals, evecs = evals.flip(0), evecs.flip(1)
    else:
        evals, evecs = torch.linalg.eigvalsh(S).flip(0), None
    top = max(float(evals[0]), 0.0) if evals.numel() else 0.0
    low = float(evals[-1]) if evals.numel() else 0.0
    guard = None
    if low < -1e-10 * top or (top == 0.0 and low < 0.0):
        rel = -low / top if top > 0 else float("inf")
        guard = Guard("eigenvalue_clamp", rel)
        if rel > warn_at:
            log.warning("eigenvalue %.3g (%.2g of the largest) clamped to 0: the statistics are far from PSD", low, rel)
    return evals.clamp_min(0), evecs, guard
