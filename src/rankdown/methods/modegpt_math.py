"""MoDeGPT's three decompositions as pure functions (docs/METHODS.md §3.1-3.3): Nyström selection
of an MLP's channels (Type I), query/key dimension scores (Type II), the whitened value-output SVD
(Type III). Statistics in float64; shapes in the docstrings. The method that applies them to a
layer is :mod:`rankdown.methods.modegpt`."""

from __future__ import annotations

from typing import Callable

import torch

from rankdown.linalg import Guard, cholesky_lower_, guarded_eigh, release_tail, row_blocks, solve_cholesky_

EIG_FLOOR = 1e-6  # eigenvalues of the attention input correlation floored at this fraction of the largest


def psd_sqrt(C: torch.Tensor, floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """``C^½`` and ``C^{-½}`` (d, d) of a symmetric PSD ``C`` (d, d), eigenvalues floored at ``floor·max``.

    The guard (value: the floor) is returned when some eigenvalue was below it.
    """
    evals, Q, _ = guarded_eigh(C)
    top = float(evals[0]) if evals.numel() else 0.0
    lo = floor * top if top > 0 else 1e-30
    guard = Guard("eigenvalue_floor", lo) if bool((evals < lo).any()) else None
    ev = evals.clamp_min(lo)
    return (Q * ev.sqrt()) @ Q.T, (Q * ev.rsqrt()) @ Q.T, guard


def ridge_leverage(C: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge leverage scores ``diag(C (C + λI)⁻¹)`` (n,) of a PSD ``C`` (n, n), in [0, 1)."""
    L, info = torch.linalg.cholesky_ex(C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
    if int(info) != 0:
        raise FloatingPointError("the correlation plus its ridge is not positive definite: it holds NaN or Inf")
    return 1.0 - lam * inverse_diag(L)


def inverse_diag(L: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``diag((L Lᵀ)⁻¹)`` (n,) of a lower-triangular ``L`` (n, n): the squared norms of ``L⁻¹``'s
    columns, solved for a block of columns at a time. Against the whole L: a corner ``L[a:, a:]``
    would need fewer operations but is copied by the solver (as large as L itself)."""
    n = L.shape[0]
    out = torch.empty(n, dtype=L.dtype, device=L.device)
    for a in range(0, n, block):
        b = min(block, n - a)
        E = torch.zeros(n, b, dtype=L.dtype, device=L.device)
        E[a : a + b].fill_diagonal_(1.0)
        out[a : a + b] = torch.linalg.solve_triangular(L, E, upper=False).square().sum(0)
    return out


def _lower_rows(L: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (ascending) of a lower-triangular ``L`` of which only the lower triangle is
    valid: (len(rows), rows[-1] + 1), the entries above each row's diagonal set to zero."""
    m = int(rows[-1]) + 1
    P = L[rows, :m]
    return P.masked_fill_(torch.arange(m, device=L.device)[None, :] > rows[:, None], 0.0)


def nystrom_mlp(
    W_down: torch.Tensor, C: torch.Tensor, k: int, ridge: float, scale: float = 1.0, consume: bool = False,
    block: int = 512, on_channels: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Guard]:
    """Type I: kept channels ``S`` (k,) ascending and the re-fitted down projection (d, k).

    W_down: (d, n) in any float dtype; C: (n, n) float64 correlation of the intermediate
    activations, times ``1/scale`` (the raw sum may be passed); only its lower triangle is read,
    the rest may be unwritten memory (:meth:`~rankdown.stats.InputStats.take_gram`). ``λ = ridge·mean diag(C)``; the
    channels are the top-k ridge leverage scores ``diag(C (C + λI)⁻¹)``, and
    ``W_down[:, all] C[:, S] (C[S, S] + λI)⁻¹`` is the ridge least-squares map from them to the
    full output. Channels that never fire score 0 and go first.

    Memory: one Cholesky factor ``C + λI = L Lᵀ``, made in C's own storage when ``consume`` (C is
    then destroyed, and freed before the end when the caller keeps no reference) and in its lower
    triangle only (:func:`~rankdown.linalg.cholesky_lower_`: the other half is never
    written, so never made resident), gives everything: the scores (1 − λ diag((L Lᵀ)⁻¹)), the
    rows ``(C + λI)[S, :] W_downᵀ = L[S] (W_down L)ᵀ`` (a block of W_down's rows at a time), and
    ``C[S, S] + λI = L[S] L[S]ᵀ``, of which only the lower triangle is formed, from its last row up,
    while the rows of L no longer needed are given back (:func:`~rankdown.linalg.release_tail`), so
    the two together never hold more than L did; that (k, k) matrix is then factorised in its own
    storage. So beyond C's lower half the working set is (k, d) and a few (block/2, n) blocks
    (measured on a 5632-channel MLP keeping 5336: 160 MB above C, against 194 MB with LAPACK's
    in-place Cholesky and a QR of ``L[S]ᵀ``, which write the other half). ``on_channels(S)`` is
    called as soon as the channels are chosen, before the refit's working set is made (MoDeGPT
    replaces the input projections there, so their full-width weights are not held through it).
    """
    mean_diag = float(C.diagonal().mean())
    lam = ridge * mean_diag if mean_diag > 0 else ridge
    L = C if consume else C.clone()
    del C  # when consumed, this frame may hold the last reference: C's storage then goes with L below
    L.diagonal().add_(lam)
    panel = max(1, block // 2)  # columns of a Cholesky panel; rows of L, W_down and T handled at once
    if cholesky_lower_(L, panel) != 0:
        raise FloatingPointError("the MLP correlation plus its ridge is not positive definite: it holds NaN or Inf")
    scores = 1.0 - lam * inverse_diag(L)
    S = torch.sort(torch.topk(scores, k).indices).values
    del scores
    if on_channels is not None:
        on_channels(S)
    n, d = L.shape[0], W_down.shape[0]
    Y = torch.empty(k, d, dtype=torch.float64, device=L.device)  # (C + λI)[S, :] W_downᵀ = L[S] (W_down L)ᵀ
    for r in range(0, d, panel):
        Wb = W_down[r : r + panel].to(device=L.device, dtype=torch.float64)
        T = torch.empty(Wb.shape[0], n, dtype=torch.float64, device=L.device)  # rows r.. of W_down L
        for c in range(0, n, panel):  # L's block column c is zero above row c
            torch.mm(Wb[:, c:], L[c:, c : c + panel], out=T[:, c : c + panel])
        del Wb
        for a in range(0, k, panel):
            P = _lower_rows(L, S[a : a + panel])
            Yb = Y[a : a + panel, r : r + panel]
            torch.mm(P, T[:, : P.shape[1]].T, out=Yb)
            del P
            # C[S, :] W_downᵀ = (C + λI)[S, :] W_downᵀ − λ W_down[:, S]ᵀ
            Yb.sub_(W_down[r : r + panel, S[a : a + panel].to(W_down.device)].T, alpha=lam)
        del T
    # C[S, S] + λI = L[S] L[S]ᵀ, its lower block triangle, from the last block row up: the rows of L
    # past the kept channels still to come are given back as it grows, so the two together never
    # hold more than L did
    G = torch.empty(k, k, dtype=torch.float64, device=L.device)
    for a in reversed(range(0, k, panel)):
        PI = _lower_rows(L, S[a : a + panel])
        for c in range(0, a + 1, panel):
            PJ = PI if c == a else _lower_rows(L, S[c : c + panel])
            torch.mm(PI[:, : PJ.shape[1]], PJ.T, out=G[a : a + panel, c : c + panel])
            del PJ
        del PI
        release_tail(L, int(S[a - 1]) + 1 if a else 0)  # L: C consumed, or a copy of it
    del L  # C's storage, the layer's largest matrix
    if cholesky_lower_(G, panel) != 0:
        raise FloatingPointError("the kept channels' correlation plus its ridge is not positive definite")
    solve_cholesky_(G, Y, panel)  # Y ← (C[S, S] + λI)⁻¹ Y
    return S, Y.T, Guard("nystrom_ridge", lam * scale)


def out_diag(W: torch.Tensor, b: torch.Tensor | None, second: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``diag E[(W x + b)(W x + b)ᵀ]`` (out,) in float64 from ``E[x xᵀ]`` (in, in) and ``E[x]`` (in,),
    float64. W: (out, in) in any float dtype, on their device, promoted a block of rows at a time."""
    d = torch.empty(W.shape[0], dtype=torch.float64, device=second.device)
    for a, Wb in row_blocks(W):
        rows = slice(a, a + Wb.shape[0])
        d[rows] = ((Wb @ second) * Wb).sum(1)
        if b is not None:
            d[rows] += 2 * b[rows] * (Wb @ mean) + b[rows].square()
    return d.clamp_min(0)


def qk_scores(dq: torch.Tensor, dk: torch.Tensor, rope: bool) -> torch.Tensor:
    """Type II scores per kv head: (kv_heads, head_dim/2) pair scores with RoPE, (kv_heads, head_dim) without.

    dq: (heads, head_dim), dk: (kv_heads, head_dim): diagonals of the per-head query/key
    correlations; ``‖C^½[:, j]‖ = √C_jj``. A query head's scores are summed into its kv head's group.
    """
    H, hd = dq.shape
    Hkv = dk.shape[0]
    s = (dq.sqrt().view(Hkv, H // Hkv, hd) * dk.sqrt()[:, None, :]).sum(1)
    return s[:, : hd // 2] + s[:, hd // 2 :] if rope else s


def kept_dims(scores: torch.Tensor, keep: int, rope: bool, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` entries of each row of ``scores`` (kv_heads, m), ascending -> (kept (kv_heads, keep),
    dimension indices within a head (kv_heads, 2·keep with RoPE, ordered ``[i..., i + head_dim/2...]``))."""
    kept = torch.sort(torch.topk(scores, keep, dim=1).indices, dim=1).values
    return kept, torch.cat([kept, kept + head_dim // 2], dim=1) if rope else kept


def vo_factors(
    C_half: torch.Tensor, C_ihalf: torch.Tensor, Wv: torch.Tensor, Wo: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Type III for one kv head: ``C^½ W_vᵀ = U Σ Vᵀ``; rank-``r`` SVD of ``Σ Vᵀ [W_o^1ᵀ … W_o^Gᵀ] ≈
    U_r Σ_r V_rᵀ``; new ``W_v = (C^{-½} U U_r)ᵀ`` and new ``W_o^h`` = block ``h`` of ``(Σ_r V_rᵀ)ᵀ``.

    C_half, C_ihalf: (d, d); Wv: (hd, d); Wo: (G, d, hd), the output columns of the G query heads
    reading this kv head -> Wv_new (r, d), Wo_new (G, d, r). Minimises the whitened error of all
    G heads' value–output products ``W_o^h W_v`` at once.
    """
    G, d, hd = Wo.shape
    U, S, Vh = torch.linalg.svd(C_half @ Wv.T, full_matrices=False)  # (d, hd), (hd,), (hd, hd)
    N = (S[:, None] * Vh) @ Wo.transpose(1, 2).permute(1, 0, 2).reshape(hd, G * d)  # (hd, G·d)
    U2, S2, V2h = torch.linalg.svd(N, full_matrices=False)
    Wv_new = (C_ihalf @ U @ U2[:, :r]).T
    Wo_new = (S2[:r, None] * V2h[:r]).T.reshape(G, d, r)
    return Wv_new, Wo_new


__all__ = ["EIG_FLOOR", "inverse_diag", "kept_dims", "nystrom_mlp", "out_diag", "psd_sqrt", "qk_scores",
           "ridge_leverage", "vo_factors"]
