"""The leading eigen-pairs of an output correlation ``W C Wᵀ`` from whichever side is smaller, and
SVD-LLM's factors from them (docs/METHODS.md §1.3): the lean routes to
:func:`~rankdown.linalg.textbook.whitened_svd_factors` and
:func:`~rankdown.linalg.textbook.output_eigh`, which tests/test_linalg.py holds them equal to.
W may be in any float dtype; everything formed is float64.
"""

from __future__ import annotations

import torch

from rankdown.linalg.guard import Guard, guarded_eigh, psd_root
from rankdown.linalg.lean import gram64, mm64, sandwich64, tmm64


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


_QR_BELOW = 1e-8  # output_eig_in orthonormalises by a QR only when a kept σ² is below this times the largest


def output_eig_in(
    W: torch.Tensor, S: torch.Tensor | None, vectors: bool | int = True,
    root: tuple[torch.Tensor, Guard | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Guard | None]:
    """Leading eigen-pairs of ``W S Wᵀ`` (out, out) from (in, in) problems, for ``out > in``.

    W: (out, in) in any float dtype; S: (in, in) symmetric PSD. With any ``R Rᵀ = S``
    (:func:`~rankdown.linalg.guard.psd_root`) and ``M = W R``, ``W S Wᵀ = M Mᵀ`` shares its
    non-zero eigenvalues with ``Mᵀ M = Rᵀ (WᵀW) R = P S² Pᵀ``, and its leading eigenvectors are ``M P / S``
    (orthonormalised by a QR, which also completes them where S is 0). Only the wanted vectors
    are formed at size (out, ·); W is promoted to float64 a block of rows at a time.
    ``vectors``: False, True (all), or how many leading ones -> eigenvalues (in,) descending,
    eigenvectors (out, k) or None, and any clamping guard. ``root``: ``psd_root(S)`` when already
    computed (linears fed the same inputs share it; S is then not read): ``M = W R`` has the same
    ``M Mᵀ`` whichever root it is.
    """
    R, guard = psd_root(S) if root is None else root  # M = W R
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
