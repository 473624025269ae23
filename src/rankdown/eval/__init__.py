"""Evaluation of (compressed) models.

    perplexity.py  perplexity with the papers' protocol       fidelity.py  agreement with the original
    tasks.py       lm-evaluation-harness accuracy             speed.py     throughput, latency, memory
    generate.py    one continuation; repeated n-grams         batched.py   greedy decoding in batches
    gencheck.py    the generation check (shipped prompts)     humaneval.py HumanEval pass@1
    sandbox.py     where HumanEval's programs run             cache.py     a dense model's figures, kept
"""

from rankdown.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
