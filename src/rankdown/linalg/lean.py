"""Memory-lean kernels: each computes what a one-line torch expression would (tests/test_linalg.py
holds them equal to it), without the full-size float64 temporaries that expression makes.

- Products ``*64``: a weight in any float dtype is promoted to float64 a block of rows at a time,
  so no float64 copy of a whole weight is made.
- Lower block triangle (``*_lower*``): a correlation summed on its lower block triangle only, the
  rest left unwritten (never made resident) until :func:`mirror_lower_`.
- In-place Cholesky and solve that read and write only the lower triangle.
- :func:`release_tail`: give the memory of a tensor's last rows back while the rest stays in use.

Conventions: docs/METHODS.md §0.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

from rankdown.heap import libc

# ----------------------------------------------------------------------------- row-blocked products
_BLOCK_BYTES = 16 * 2**20  # float64 rows promoted at once by the *64 products


def row_blocks(W: torch.Tensor, block_bytes: int | None = None):
    """(start, float64 copy of a block of W's rows) covering W: (out, in); ``block_bytes`` of
    float64 at a time (default ``_BLOCK_BYTES``)."""
    step = max(1, (block_bytes or _BLOCK_BYTES) // (8 * max(W.shape[1], 1)))
    for a in range(0, W.shape[0], step):
        yield a, W[a : a + step].to(torch.float64)


def gram64(W: torch.Tensor) -> torch.Tensor:
    """``Wᵀ W`` (in, in) in float64, W: (out, in) in any float dtype (one block triangle summed,
    then mirrored: about half the multiply-adds)."""
    G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for _, blk in row_blocks(W):
        syrk_lower_(G, blk)
    return mirror_lower_(G)


def mm64(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``W @ M`` (out, k) in float64, W: (out, in) in any float dtype, M: (in, k) float64."""
    out = torch.empty(W.shape[0], M.shape[1], dtype=torch.float64, device=W.device)
    for a, blk in row_blocks(W):
        torch.mm(blk, M, out=out[a : a + blk.shape[0]])
    return out


def tmm64(V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Vᵀ @ W`` (k, in) in float64, V: (out, k) float64, W: (out, in) in any float dtype."""
    out = torch.zeros(V.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for a, blk in row_blocks(W):
        out.addmm_(V[a : a + blk.shape[0]].T, blk)
    return out


def sandwich64(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``W C Wᵀ`` (out, out) in float64; W: (out, in) in any float dtype, C: (in, in) symmetric."""
    M = torch.empty(W.shape[0], W.shape[0], dtype=torch.float64, device=W.device)
    for a, blk in row_blocks(W):
        M[:, a : a + blk.shape[0]] = mm64(W, (blk @ C).T)
    return M


# ----------------------------------------------------------------------------- lower block triangle
def _block(dim: int) -> int:
    # measured on 2 cores: 512-wide blocks make a 2048² update 1.6x faster, 1024 a 5632² one 1.5x
    return 512 * -(-dim // 4096)


_FINE = 256  # the diagonal blocks' own block size: less of the unwritten upper half is touched


def lower_blocks(dim: int):
    """(rows, cols) slices tiling the lower block triangle that :func:`syrk_lower_` writes: under
    each ``_block``-wide diagonal block its whole column panel, within it a finer lower block
    triangle (so about half of a large matrix plus ``_FINE/2`` columns a row is ever written)."""
    b = _block(dim)
    for a in range(0, dim, b):
        e = min(a + b, dim)
        if e < dim:
            yield slice(e, dim), slice(a, e)
        for c in range(a, e, _FINE):
            yield slice(c, e), slice(c, min(c + _FINE, e))


def syrk_lower_(G: torch.Tensor, X: torch.Tensor) -> None:
    """``G += Xᵀ X`` on the lower block triangle of G only (about half the multiply-adds of a
    full product); the blocks above it are left stale until :func:`mirror_lower_`. X: (rows, d)."""
    for rows, cols in lower_blocks(X.shape[1]):
        G[rows, cols].addmm_(X[:, rows].T, X[:, cols])


def zeros_lower(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (dim, dim) float64 matrix whose lower block triangle (what :func:`syrk_lower_` adds to)
    is zero and the rest unwritten: left untouched, those pages are never made resident, so a large
    correlation costs little more than half its size in memory until it is mirrored (MoDeGPT's
    intermediate², 254 MB: 142 MB measured during the pass that fills it)."""
    G = torch.empty(dim, dim, dtype=torch.float64, device=device)
    for rows, cols in lower_blocks(dim):
        G[rows, cols].zero_()
    return G


def sub_outer_lower_(G: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``G −= u uᵀ`` on the lower block triangle that :func:`syrk_lower_` writes only (the rest
    may be unwritten memory), in place. Returns G."""
    for rows, cols in lower_blocks(G.shape[0]):
        G[rows, cols].addr_(u[rows], u[cols], alpha=-1)
    return G


def mirror_lower_(G: torch.Tensor) -> torch.Tensor:
    """Make G exactly symmetric from its lower triangle (after :func:`syrk_lower_`), in place, a
    block at a time. Returns G."""
    d = G.shape[0]
    b = _block(d)
    for a in range(0, d, b):
        D = G[a : a + b, a : a + b]
        D.copy_(D.tril() + D.tril(-1).T)
        G[a : a + b, a + b :] = G[a + b :, a : a + b].T
    return G


# ----------------------------------------------------------------------------- in-place Cholesky
def cholesky_lower_(A: torch.Tensor, block: int = 256) -> int:
    """In-place Cholesky ``A = L Lᵀ`` of a symmetric positive definite A (n, n), reading and writing
    only its lower block triangle: L is left there, the upper triangles of the diagonal blocks are
    set to zero and every entry above them is neither read nor written (so a correlation whose
    upper half was never written, as :func:`zeros_lower` makes it, keeps those pages out of memory;
    LAPACK's in-place factorisation writes zeros over the whole other half).
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


# ----------------------------------------------------------------------------- memory given back
_MADV_DONTNEED = 4


def release_tail(t: torch.Tensor, start: int) -> None:
    """Give the memory of rows ``start..`` of a contiguous CPU tensor back to the system now, while
    the rest of it stays in use: the whole pages of those rows are dropped (``madvise(DONTNEED)``),
    so what the rows hold afterwards is undefined (zeros where a page went, the old values in the
    page they share with the row before). For a matrix consumed from its last row up, whose rows
    are never read again (MoDeGPT's Cholesky factor while the kept channels' correlation is formed).
    A no-op off Linux or on another device."""
    if t.device.type != "cpu" or not t.is_contiguous() or start >= t.shape[0] or t.numel() == 0:
        return
    lib = libc()
    if lib is None or not hasattr(lib, "madvise"):
        return
    page = mmap.PAGESIZE
    first = t.data_ptr() + max(start, 0) * t.stride(0) * t.element_size()
    end = t.data_ptr() + t.numel() * t.element_size()
    a, e = -(-first // page) * page, end // page * page
    if e > a:
        lib.madvise(ctypes.c_void_p(a), ctypes.c_size_t(e - a), _MADV_DONTNEED)
