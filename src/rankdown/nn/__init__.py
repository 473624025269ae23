"""Modules of compressed models."""

from rankdown.nn.portable import LowRankLinear, ReducedAttention, ReducedLinear, UnfusedExperts, apply_structure

__all__ = ["LowRankLinear", "ReducedAttention", "ReducedLinear", "UnfusedExperts", "apply_structure"]
