"""Baseline: activation-aware SVD (Yuan et al. 2023). docs/METHODS.md §1.2."""

from __future__ import annotations

import torch

from rankdown.config import ASVDConfig
from rankdown.methods.base import Method
from rankdown.methods.linalg import asvd_factors
from rankdown.stats import InputStats


class ASVD(Method):
    config_class = ASVDConfig
    needs_gram = False

    def factorize(self, W: torch.Tensor, stats: InputStats, rank: int):
        A, B = asvd_factors(W.to(torch.float64), stats.abs_mean, rank, self.config.alpha)
        return A, B, None
