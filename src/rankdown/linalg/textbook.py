"""The plain definitions, as the papers write them: a few lines of torch each, float64 in and out.

:func:`split_sqrt`, :func:`svd_factors` and :func:`asvd_factors` are what the methods use. The
others are the definitions that the lean routes of :mod:`rankdown.linalg.spectrum` and
:mod:`rankdown.linalg.guard` compute without their full-size temporaries; tests/test_linalg.py
holds each lean route equal to its definition here.

Conventions (docs/METHODS.md §0): a weight ``W`` is (out, in); a rank-``r`` factorisation returns
``A``: (r, in) and ``B``: (out, r) with ``W ≈ B @ A``.
"""

from __future__ import annotations

import torch


def split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors of ``U diag(S) Vh`` with ``Σ^½`` on each side (docs/METHODS.md §1.1).

    U: (out, k), S: (k,), Vh: (k, in) -> A: (r, in), B: (out, r).
    """
    s = S[:r].clamp_min(0).sqrt()
    return s[:, None] * Vh[:r], U[:, :r] * s[None, :]


def svd_factors(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)`` (docs/METHODS.md §1.1).
    W: (out, in) -> A: (r, in), B: (out, r)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return split_sqrt(U, S, Vh, r)


def asvd_factors(
    W: torch.Tensor, abs_mean: torch.Tensor, r: int, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD (docs/METHODS.md §1.2): SVD of ``W S`` with ``S = diag(mean|x|)^α``; ``A = Σ_r^½ V_rᵀ S⁻¹``.

    W: (out, in), abs_mean: (in,) -> A: (r, in), B: (out, r). Channels that never fire get the
    smallest positive scale (floor 1e-6 of the largest) so ``S⁻¹`` stays finite.
    """
    s = abs_mean.clamp_min(0).pow(alpha)
    s = s.clamp_min(max(s.max().item(), 1e-30) * 1e-6)
    A, B = svd_factors(W * s[None, :], r)
    return A / s[None, :], B


def whitened_svd_factors(W: torch.Tensor, C: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM as the paper writes it (docs/METHODS.md §1.3): whiten by ``C = L Lᵀ`` (Cholesky; C
    positive definite), ``W L = U Σ Vᵀ``, ``A = Σ_r^½ V_rᵀ L⁻¹``, ``B = U_r Σ_r^½``.
    W: (out, in), C: (in, in) -> A: (r, in), B: (out, r)."""
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    A, B = split_sqrt(U, S, Vh, r)
    return torch.linalg.solve_triangular(L, A, upper=False, left=False), B


def psd_root(S: torch.Tensor) -> torch.Tensor:
    """A root ``R = Q Λ^½`` (d, d) with ``R Rᵀ = S`` of a symmetric PSD ``S = Q Λ Qᵀ``
    (docs/METHODS.md §1.3); any other root (a Cholesky factor) differs from it by an orthogonal
    factor on the right."""
    lam, Q = torch.linalg.eigh(S)
    return Q * lam.clamp_min(0).sqrt()[None, :]


def output_eigh(W: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-pairs of ``W S Wᵀ`` (out, out) in descending order (docs/METHODS.md §1.3), negative
    rounding clamped to 0. W: (out, in), S: (in, in) -> eigenvalues (out,), eigenvectors (out, out)."""
    lam, U = torch.linalg.eigh(W @ S @ W.T)
    return lam.flip(0).clamp_min(0), U.flip(1)
