"""Evaluation of (compressed) models: perplexity with the papers' protocol."""

from rankdown.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
