"""Running float64 statistics of the rows a linear layer sees."""

from __future__ import annotations

import torch


class InputStats:
    """Accumulates ``n``, ``Σx``, ``Σ|x|`` and ``C = Σ x xᵀ`` of input rows ``x`` (dim,) in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", gram: bool = True) -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        # the (dim, dim) correlation dominates the cost; methods that only need means skip it
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device) if gram else None

    def add(self, x: torch.Tensor, rows: int = 256) -> None:
        """Add rows ``x``: (..., dim), promoted to float64 ``rows`` at a time (an MLP's wide
        activations are never copied whole)."""
        x = x.reshape(-1, self.dim)
        self.n += x.shape[0]
        for part in x.split(rows):
            part = part.to(self.sum.device, torch.float64)
            self.sum += part.sum(0)
            self.abs_sum += torch.linalg.vector_norm(part, 1, dim=0)
            if self.gram is not None:
                self.gram.addmm_(part.T, part)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``C / n``: (dim, dim)."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the correlation matrix (gram=False)")
        return self.gram / max(self.n, 1)
