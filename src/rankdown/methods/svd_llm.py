"""Baseline: SVD-LLM, truncation-aware whitening (Wang et al. 2024). docs/METHODS.md §1.3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from rankdown.config import MethodConfig
from rankdown.linalg import output_gram_factors, whitened_svd_factors
from rankdown.methods.base import Method, install_factors, register
from rankdown.stats import InputStats

if TYPE_CHECKING:
    from rankdown.engine import LayerContext


@dataclass
class SVDLLMConfig(MethodConfig):
    """SVD-LLM (Wang et al. 2024): truncation-aware whitening by the Cholesky factor of C_in."""

    method: ClassVar[str] = "svd-llm"


@register
class SVDLLM(Method):
    config_class = SVDLLMConfig
    order = 30

    def factorize(self, W: torch.Tensor, stats: InputStats, rank: int):
        if stats.n == 0:  # a linear no token reached (an expert never routed to): the weight's own SVD
            return whitened_svd_factors(W, torch.eye(W.shape[1], dtype=torch.float64, device=W.device), rank)
        return whitened_svd_factors(W, stats.gram, rank, 1.0 / stats.n)  # the sum itself: no scaled copy

    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        """As every method, group by group; but a group whose linears all have fewer outputs than
        inputs (down_proj) sums its outputs' correlations ``W C Wᵀ`` — all SVD-LLM needs of C —
        instead of the input correlation: hidden² rather than intermediate² floats, the largest
        matrix of a layer's pass."""
        for group in ctx.groups():
            names = [n for n in group if n in ranks]
            if not names:
                continue
            narrow = all(ctx.module(n).out_features < ctx.module(n).in_features for n in names)
            ins, outs = ctx.collect((), names, replay=True) if narrow else (ctx.collect_inputs(names, replay=True), {})
            for name in names:
                W = ctx.module(name).weight.detach()
                out = outs.get(name)
                if out is not None and out.n > 0:
                    A, B, guard = output_gram_factors(W, out.gram, ranks[name], 1.0 / out.n)
                else:
                    A, B, guard = self.factorize(W, ins.get(name) or InputStats(W.shape[1], W.device, gram=False), ranks[name])
                install_factors(ctx, name, A, B, guard=guard)
