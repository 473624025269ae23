"""Running float64 statistics of the rows a linear layer sees (kernels: :mod:`rankdown.linalg.lean`)."""

from __future__ import annotations

import torch

from rankdown.linalg.lean import lower_blocks, mirror_lower_, sub_outer_lower_, syrk_lower_, zeros_lower


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
        for rows, cols in lower_blocks(self.dim):
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
