"""Pure linear algebra shared by the methods. All inputs and outputs are float64 tensors, except
the weights the ``*64`` helpers take: those may stay in the model's dtype, and are promoted to
float64 a block of rows at a time, so no float64 copy of a whole weight is ever made.

Conventions (docs/METHODS.md §0): a weight ``W`` is (out, in); a rank-``r`` factorisation returns
``A``: (r, in) and ``B``: (out, r) with ``W ≈ B @ A``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rankdown.stats import mirror_lower_, syrk_lower_

log = logging.getLogger(__name__)


@dataclass
class Guard:
    """A regulariser that had to be added to make a decomposition succeed (reported to the user)."""

    kind: str
    value: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}


_BLOCK_BYTES = 16 * 2**20  # float64 rows promoted at once by the *64 helpers


def _row_blocks(W: torch.Tensor, block_bytes: int = _BLOCK_BYTES):
    """(start, float64 copy of a block of W's rows) covering W: (out, in)."""
    step = max(1, block_bytes // (8 * max(W.shape[1], 1)))
    for a in range(0, W.shape[0], step):
        yield a, W[a : a + step].to(torch.float64)


def gram64(W: torch.Tensor) -> torch.Tensor:
    """``Wᵀ W`` (in, in) in float64, W: (out, in) in any float dtype (one block triangle summed,
    then mirrored: about half the multiply-adds)."""
    G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for _, blk in _row_blocks(W):
        syrk_lower_(G, blk)
    return mirror_lower_(G)


def mm64(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``W @ M`` (out, k) in float64, W: (out, in) in any float dtype, M: (in, k) float64."""
    out = torch.empty(W.shape[0], M.shape[1], dtype=torch.float64, device=W.device)
    for a, blk in _row_blocks(W):
        torch.mm(blk, M, out=out[a : a + blk.shape[0]])
    return out


def tmm64(V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Vᵀ @ W`` (k, in) in float64, V: (out, k) float64, W: (out, in) in any float dtype."""
    out = torch.zeros(V.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for a, blk in _row_blocks(W):
        out.addmm_(V[a : a + blk.shape[0]].T, blk)
    return out


def cholesky_lower_(A: torch.Tensor, block: int = 256) -> int:
    """In-place Cholesky ``A = L Lᵀ`` of a symmetric positive definite A (n, n), reading and writing
    only its lower block triangle: L is left there, the upper triangles of the diagonal blocks are
    set to zero and every entry above them is neither read nor written (so a correlation whose
    upper half was never written, as :func:`~rankdown.stats.zeros_lower` makes it, keeps those
    pages out of memory; LAPACK's in-place factorisation writes zeros over the whole other half).
    Right-looking by panels of ``block`` columns: a small Cholesky of the diagonal block, a
    triangular solve of the panel below it, a rank-``block`` update of the lower block triangle to
    its right. Returns LAPACK's ``info``: 0, or the 1-based order of the first minor that is not
    positive definite (A then holds a partial factorisation)."""
    n = A.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        D = A[a:b, a:b]
        Ld, info = torch.linalg.cholesky_ex(D)  # reads D's lower triangle only
        if int(info) != 0:
            return a + int(info)
        D.copy_(Ld)
        if b == n:
            break
        P = A[b:, a:b]  # P ← P Ld⁻ᵀ
        P.copy_(torch.linalg.solve_triangular(Ld.mT, P, upper=True, left=False))
        for j in range(b, n, block):  # A[b:, b:] −= P Pᵀ on the lower block triangle
            e = min(j + block, n)
            A[j:, j:e].addmm_(P[j - b :], P[j - b : e - b].T, alpha=-1.0)
    return 0


def solve_cholesky_(L: torch.Tensor, Y: torch.Tensor, block: int = 256) -> None:
    """``Y ← (L Lᵀ)⁻¹ Y`` in place. L: (k, k) lower triangular, of which only the lower triangle is
    read (above it may hold anything: :func:`cholesky_lower_` leaves it unwritten); Y: (k, m).
    Solved a block of rows at a time, L used where it lies: only its diagonal blocks are copied."""
    k = L.shape[0]
    starts = list(range(0, k, block))
    for a in starts:  # L Z = Y: forward substitution
        b = min(a + block, k)
        if a:
            Y[a:b] -= L[a:b, :a] @ Y[:a]
        Y[a:b] = torch.linalg.solve_triangular(L[a:b, a:b].tril(), Y[a:b], upper=False)
    for a in reversed(starts):  # Lᵀ X = Z: back substitution
        b = min(a + block, k)
        if b < k:
            Y[a:b] -= L[b:, a:b].T @ Y[b:]
        Y[a:b] = torch.linalg.solve_triangular(L[a:b, a:b].tril().mT, Y[a:b], upper=True)


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


def whitened_svd_factors(
    W: torch.Tensor, C: torch.Tensor, r: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """SVD-LLM: the rank-``r`` factors minimising ``‖(W − BA) X‖`` over the calibration inputs.

    W: (out, in) in any float dtype; C: (in, in) float64 input second moment ``X Xᵀ / n`` (or a
    multiple: ``scale`` times it is used, so the raw sum can be passed without a scaled copy)
    -> A: (r, in), B: (out, r) float64, and any eigenvalue-clamping guard.

    The paper whitens: ``L = chol(C)``, ``W L = U Σ Vᵀ``, ``A = Σ_r^½ V_rᵀ L⁻¹``, ``B = U_r Σ_r^½``.
    Since ``V_rᵀ L⁻¹ = Σ_r⁻¹ U_rᵀ W``, the same factors are ``B = U_r Σ_r^½``,
    ``A = Σ_r^{-½} U_rᵀ W`` with ``U Σ² Uᵀ = W C Wᵀ``: computed here from that (out, out)
    eigenproblem when ``out <= in``, else from (in, in) ones (:func:`output_eig_in`). Neither a
    Cholesky factor, its ridge, nor any (out, in) matrix in float64 is formed, so a singular C
    needs no regulariser and the working set is a few of the smaller side's square matrices.
    Directions of zero output energy (σ below 1e-10 of the largest) get unscaled factors.
    """
    out_f, in_f = W.shape
    if out_f <= in_f:
        return output_gram_factors(W, sandwich64(W, C), r, scale)
    s2, U, guard = output_eig_in(W, C, r)
    return _balanced_factors(W, s2, U, scale, guard)


def output_gram_factors(
    W: torch.Tensor, G: torch.Tensor, r: int, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """SVD-LLM's factors from ``G = W C Wᵀ`` (out, out) float64 itself, ``scale`` times it used:
    the correlation of the linear's outputs (bias left out), which the calibration pass can sum
    directly — for a linear with ``out < in`` it is the smaller matrix (down_proj: hidden² instead
    of intermediate²). Same factors as :func:`whitened_svd_factors`."""
    s2, U, guard = guarded_eigh(G, vectors=True)
    return _balanced_factors(W, s2, U[:, :r], scale, guard)


def _balanced_factors(
    W: torch.Tensor, s2: torch.Tensor, U: torch.Tensor, scale: float, guard: Guard | None
) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """``A = Σ^{-½} Uᵀ W``, ``B = U Σ^½`` from the leading eigenpairs (s2 = σ², U) of ``W C Wᵀ``."""
    s2 = s2[: U.shape[1]] * scale
    root = s2.sqrt().sqrt()  # Σ^½
    root = torch.where(root > root[:1] * 1e-5, root, torch.ones_like(root))
    return tmm64(U / root[None, :], W), U * root[None, :], guard


def sandwich64(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``W C Wᵀ`` (out, out) in float64; W: (out, in) in any float dtype, C: (in, in) symmetric."""
    M = torch.empty(W.shape[0], W.shape[0], dtype=torch.float64, device=W.device)
    for a, blk in _row_blocks(W):
        M[:, a : a + blk.shape[0]] = mm64(W, (blk @ C).T)
    return M


def psd_root(S: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, Guard | None]:
    """``R = Q Λ^½`` (d, d) with ``R Rᵀ = S`` for a symmetric PSD ``S = Q Λ Qᵀ``, and any clamping guard.
    ``inplace``: R takes S's storage (see :func:`guarded_eigh`)."""
    lam, R, guard = guarded_eigh(S, vectors=True, inplace=inplace)
    return R.mul_(lam.sqrt()[None, :]), guard


def psd_factor(S: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, Guard | None]:
    """Some ``R`` (d, d) with ``R Rᵀ = S`` for a symmetric PSD ``S``: the Cholesky factor when S is
    positive definite (a few times cheaper than an eigendecomposition), else :func:`psd_root`.
    Only the lower triangle of S is read. ``inplace``: S may be overwritten (the root then takes its
    storage); the caller holds no other reference, so a Cholesky factor frees it."""
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L, None
    del L
    return psd_root(S, inplace)


def output_eig_in(
    W: torch.Tensor, S: torch.Tensor | None, vectors: bool | int = True,
    root: tuple[torch.Tensor, Guard | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Guard | None]:
    """Leading eigen-pairs of ``W S Wᵀ`` (out, out) from (in, in) problems, for ``out > in``.

    W: (out, in) in any float dtype; S: (in, in) symmetric PSD. With any ``R Rᵀ = S`` (Cholesky
    when S is definite, ``Q Λ^½`` otherwise) and ``M = W R``, ``W S Wᵀ = M Mᵀ`` shares its
    non-zero eigenvalues with ``Mᵀ M = Rᵀ (WᵀW) R = P S² Pᵀ``, and its leading eigenvectors are ``M P / S``
    (orthonormalised by a QR, which also completes them where S is 0). Only the wanted vectors
    are formed at size (out, ·); W is promoted to float64 a block of rows at a time.
    ``vectors``: False, True (all), or how many leading ones -> eigenvalues (in,) descending,
    eigenvectors (out, k) or None, and any clamping guard. ``root``: any ``R`` with ``R Rᵀ = S``
    (:func:`psd_factor`) when already computed (linears fed the same inputs share it; S is then not
    read): ``M = W R`` has the same ``M Mᵀ`` whichever root it is.
    """
    R, guard = psd_factor(S) if root is None else root  # M = W R
    G = R.T @ gram64(W) @ R
    s2, P, g2 = guarded_eigh(G, vectors=bool(vectors), inplace=True)  # P: G's storage
    del G
    guard = guard or g2
    if not vectors:
        return s2, None, guard
    k = s2.numel() if vectors is True else min(int(vectors), s2.numel())
    RP = R @ P[:, :k]
    del P
    U = mm64(W, RP)
    if k and float(s2[k - 1]) > _QR_BELOW * float(s2[0]):
        # M p / σ is orthonormal up to rounding of order eps·σ₀²/σ_k²: no QR needed (it cost as
        # much as the rest on an MLP's up/gate)
        return s2, U.div_(s2[:k].sqrt()[None, :]), guard
    U, _ = torch.linalg.qr(U)
    return s2, U, guard


_QR_BELOW = 1e-8  # output_eig_in orthonormalises by a QR only when a kept σ² is below this times the largest


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
