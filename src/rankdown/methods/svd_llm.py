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
        return whitened_svd_factors(W, stats.second_moment, rank)
