"""Linear algebra of the methods: textbook functions, and the memory-lean kernels tested equal to them.

- :mod:`~rankdown.linalg.textbook`: the plain definitions, as the papers write them.
- :mod:`~rankdown.linalg.lean`: blocked float64 products, the lower-block-triangle correlation
  kernels, an in-place Cholesky and solve, and giving a tensor's memory back.
- :mod:`~rankdown.linalg.guard`: :class:`Guard`, the guarded eigendecomposition and matrix root.
- :mod:`~rankdown.linalg.spectrum`: the eigen-pairs of ``W C Wᵀ`` from the smaller side, and
  SVD-LLM's factors from them.

tests/test_linalg.py holds each lean kernel and route equal to its textbook definition.
"""

from rankdown.linalg.guard import Guard, guarded_eigh, psd_root
from rankdown.linalg.lean import (
    cholesky_lower_, gram64, lower_blocks, mirror_lower_, mm64, release_tail, row_blocks, sandwich64,
    solve_cholesky_, sub_outer_lower_, syrk_lower_, tmm64, zeros_lower,
)
from rankdown.linalg.spectrum import output_eig_in, output_gram_factors, whitened_svd_factors
from rankdown.linalg.textbook import asvd_factors, split_sqrt, svd_factors

__all__ = [
    "Guard", "asvd_factors", "cholesky_lower_", "gram64", "guarded_eigh", "lower_blocks", "mirror_lower_",
    "mm64", "output_eig_in", "output_gram_factors", "psd_root", "release_tail", "row_blocks", "sandwich64",
    "solve_cholesky_", "split_sqrt", "sub_outer_lower_", "svd_factors", "syrk_lower_", "tmm64",
    "whitened_svd_factors", "zeros_lower",
]
