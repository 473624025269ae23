"""Guarded decompositions: every eigenvalue clamp is reported as a :class:`Guard`, never applied
silently (docs/METHODS.md §0). Both read only the lower triangle of their symmetric input, which
may be unwritten memory above it (:func:`~rankdown.linalg.lean.zeros_lower`), and can work in its
storage (``inplace``).
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


def guarded_eigh(
    S: torch.Tensor, vectors: bool = True, warn_at: float = 1e-6, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, Guard | None]:
    """Eigen-pairs of a symmetric PSD matrix in descending order, negative eigenvalues clamped to 0.

    S: (d, d) -> eigenvalues (d,), eigenvectors (d, d) as columns (None unless ``vectors``), and a
    guard when an eigenvalue below ``-1e-10·max`` had to be clamped (value: the most negative
    eigenvalue over the largest); rounding noise below that is clamped silently. Raises on NaN/Inf.
    Only the lower triangle of S is read. ``inplace`` (with ``vectors``, S contiguous): the
    eigenvectors are computed in S's own storage (returned as ``S.mT``, S destroyed), so no (d, d)
    matrix is allocated but LAPACK's workspace: for a 2048² problem 64 MB instead of 96 MB above S.
    """
    inplace = inplace and bool(vectors) and S.is_contiguous()
    if not _lower_finite(S):
        raise FloatingPointError("statistics matrix contains NaN or Inf")
    # LAPACK reads one triangle only: no symmetrised copy is made (on the largest matrices of a
    # layer each (d, d) copy is the peak's margin), and the eigenvectors are reordered in place.
    if inplace:
        # S's lower triangle, row-major, is the upper triangle of the column-major S.mT: LAPACK
        # overwrites it with the eigenvectors, torch's out= taking S.mT as its own layout
        evecs = S.mT
        evals = torch.empty(S.shape[0], dtype=S.dtype, device=S.device)
        torch.linalg.eigh(evecs, UPLO="U", out=(evals, evecs))
        evals = evals.flip(0)
        _reverse_columns(evecs)
    elif vectors:
        evals, evecs = torch.linalg.eigh(S)
        evals = evals.flip(0)
        _reverse_columns(evecs)
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


def psd_root(S: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, Guard | None]:
    """A root ``R`` (d, d) with ``R Rᵀ = S`` of a symmetric PSD ``S`` (docs/METHODS.md §1.3), and
    any clamping guard: the Cholesky factor when S is positive definite (a few times cheaper than
    an eigendecomposition), else ``Q Λ^½`` from :func:`guarded_eigh`. Only the lower triangle of S
    is read. ``inplace``: S may be overwritten (the root then takes its storage); the caller holds
    no other reference, so a Cholesky factor frees it."""
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L, None
    del L
    lam, R, guard = guarded_eigh(S, vectors=True, inplace=inplace)
    return R.mul_(lam.sqrt()[None, :]), guard


def _reverse_columns(M: torch.Tensor, block: int = 256) -> None:
    """Reverse the column order of M (d, n) in place, ``block`` column pairs at a time."""
    n = M.shape[1]
    for a in range(0, n // 2, block):
        b = min(block, n // 2 - a)
        left = M[:, a : a + b].clone()
        M[:, a : a + b] = M[:, n - a - b : n - a].flip(1)
        M[:, n - a - b : n - a] = left.flip(1)


def _lower_finite(S: torch.Tensor, block: int = 256) -> bool:
    """Whether the lower triangle of S (d, d), diagonal included, is finite; nothing above it is read."""
    d = S.shape[0]
    for a in range(0, d, block):
        e = min(a + block, d)
        if not bool(torch.isfinite(S[a:e, :a]).all()) or not bool(torch.isfinite(S[a:e, a:e].tril()).all()):
            return False
    return True
