"""Running float64 statistics of the rows a linear layer sees."""

from __future__ import annotations

import torch


def _block(dim: int) -> int:
    # measured on 2 cores: 512-wide blocks make a 2048² update 1.6x faster, 1024 a 5632² one 1.5x
    return 512 * -(-dim // 4096)


_FINE = 256  # the diagonal blocks' own block size: less of the unwritten upper half is touched


def _lower_blocks(dim: int):
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
    for rows, cols in _lower_blocks(X.shape[1]):
        G[rows, cols].addmm_(X[:, rows].T, X[:, cols])


def zeros_lower(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (dim, dim) float64 matrix whose lower block triangle (what :func:`syrk_lower_` adds to)
    is zero and the rest unwritten: left untouched, those pages are never made resident, so a large
    correlation costs little more than half its size in memory until it is mirrored (MoDeGPT's
    intermediate², 254 MB: 142 MB measured during the pass that fills it)."""
    G = torch.empty(dim, dim, dtype=torch.float64, device=device)
    for rows, cols in _lower_blocks(dim):
        G[rows, cols].zero_()
    return G


def sub_outer_lower_(G: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``G −= u uᵀ`` on the lower block triangle that :func:`syrk_lower_` writes only (the rest
    may be unwritten memory), in place. Returns G."""
    for rows, cols in _lower_blocks(G.shape[0]):
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


class InputStats:
    """Accumulates ``n``, ``Σx``, ``Σ|x|`` and ``C = Σ x xᵀ`` of input rows ``x`` (dim,) in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", gram: bool = True) -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        # the (dim, dim) correlation dominates the cost; methods that only need means skip it
        self._gram = zeros_lower(dim, device) if gram else None
        self._mirrored = False  # the block triangle above the diagonal is unwritten until mirrored

    @property
    def gram(self) -> torch.Tensor | None:
        """``Σ x xᵀ`` (dim, dim), symmetric (accumulated on one block triangle, completed on first read)."""
        if self._gram is not None and not self._mirrored:
            mirror_lower_(self._gram)
            self._mirrored = True
        return self._gram

    def add(self, x: torch.Tensor, rows: int = 256, shift: torch.Tensor | None = None) -> None:
        """Add rows ``x``: (..., dim), promoted to float64 ``rows`` at a time (an MLP's wide
        activations are never copied whole); ``shift`` (dim,): added are the rows ``x − shift``."""
        x = x.reshape(-1, self.dim)
        self.n += x.shape[0]
        if shift is not None:
            shift = shift.to(self.sum.device, torch.float64)
        for part in x.split(rows):
            part = part.to(self.sum.device, torch.float64)
            if shift is not None:
                part = part - shift
            self.sum += part.sum(0)
            self.abs_sum += torch.linalg.vector_norm(part, 1, dim=0)
            if self._gram is not None:
                syrk_lower_(self._gram, part)
                self._mirrored = False

    def take_gram(self, lower: bool = False) -> torch.Tensor:
        """``Σ x xᵀ`` (dim, dim), handed over: these statistics drop their reference, so a consumer
        that works in its storage (MoDeGPT's in-place Cholesky) frees it when it is done instead
        of leaving it resident until the statistics go. The statistics hold no correlation after.
        ``lower``: only the lower triangle (diagonal included) is valid, the rest is unwritten
        memory; for a consumer that reads no more (LAPACK's Cholesky), saving the mirror's pages."""
        if self._gram is None:
            raise ValueError("these statistics hold no correlation matrix (collected with gram=False, or taken)")
        G = self._gram if lower else self.gram
        self._gram = None
        return G

    def take_moment(self, center: bool = False) -> torch.Tensor:
        """The second moment ``C / n`` (or, ``center``, the covariance ``C / n − μ μᵀ``), (dim, dim),
        formed in the correlation's own storage and handed over as :meth:`take_gram` does: only the
        lower block triangle (what :func:`syrk_lower_` wrote, diagonal included) is valid, the rest
        is unwritten memory; for consumers that read the lower triangle only (LAPACK's eigh and
        Cholesky). No (dim, dim) copy is made: ROM's statistics of a 2048-wide linear cost one
        matrix here instead of four (the mirrored correlation, C/n, μμᵀ and their difference)."""
        mean = self.mean
        G = self.take_gram(lower=True)
        n = max(self.n, 1)
        for rows, cols in _lower_blocks(self.dim):
            G[rows, cols].div_(n)
        return sub_outer_lower_(G, mean) if center else G

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``C / n``: (dim, dim)."""
        if self._gram is None:
            raise ValueError("these statistics hold no correlation matrix (collected with gram=False, or taken)")
        return self.gram / max(self.n, 1)
