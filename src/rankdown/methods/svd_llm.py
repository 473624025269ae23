"""Baseline: SVD-LLM, truncation-aware whitening (Wang et al. 2024). METHODS.md §1."""

from __future__ import annotations

import torch

from rankdown.config import SVDLLMConfig
from rankdown.methods.base import Method
from rankdown.methods.linalg import whitened_svd_factors
from rankdown.stats import InputStats


class SVDLLM(Method):
    config_class = SVDLLMConfig

    def factorize(self, W: torch.Tensor, stats: InputStats, rank: int):
        if stats.n == 0:  # a linear no token reached (an expert never routed to): the weight's own SVD
            return whitened_svd_factors(W, torch.eye(W.shape[1], dtype=torch.float64, device=W.device), rank)
        return whitened_svd_factors(W, stats.gram, rank, 1.0 / stats.n)  # the sum itself: no scaled copy
