"""Baseline: plain truncated SVD of each weight (data-free). docs/METHODS.md §1.1."""

from __future__ import annotations

import torch

from rankdown.config import SVDConfig
from rankdown.methods.base import Method
from rankdown.methods.linalg import svd_factors


class SVD(Method):
    config_class = SVDConfig
    needs_calibration = False

    def factorize(self, W: torch.Tensor, stats, rank: int):
        A, B = svd_factors(W.to(torch.float64), rank)
        return A, B, None
