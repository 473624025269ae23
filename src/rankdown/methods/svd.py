"""Baseline: plain truncated SVD of each weight (data-free). docs/METHODS.md §1.1."""

from __future__ import annotations

import torch

from dataclasses import dataclass
from typing import ClassVar

from rankdown.config import MethodConfig
from rankdown.linalg import svd_factors
from rankdown.methods.base import Method, register


@dataclass
class SVDConfig(MethodConfig):
    """Plain truncated SVD of each weight (data-free baseline)."""

    method: ClassVar[str] = "svd"


@register
class SVD(Method):
    config_class = SVDConfig
    needs_calibration = False
    order = 10

    def factorize(self, W: torch.Tensor, stats, rank: int):
        A, B = svd_factors(W.to(torch.float64), rank)
        return A, B, None
