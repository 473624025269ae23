"""Modules of compressed models."""

from rankdown.nn.portable import LowRankLinear, UnfusedExperts, apply_structure

__all__ = ["LowRankLinear", "UnfusedExperts", "apply_structure"]
