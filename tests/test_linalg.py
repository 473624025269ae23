"""rankdown.linalg: the textbook definitions against their defining properties (docs/METHODS.md §1),
then every memory-lean kernel and route equal to its textbook counterpart on random inputs, then
what makes the lean ones lean (what they read, write and give back).

Tolerances are relative (max |lean − textbook| / max |textbook|): the worst measured over 20 seeds
on this machine (float64, MKL, one thread), times about 10; the measured value is in each comment."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankdown.linalg import asvd_factors, guard, lean, spectrum, svd_factors, textbook, whitened_svd_factors


def _data(out_f=24, in_f=32, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    # inputs with a few dominant directions, as real activations have
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) * torch.logspace(1, -2, in_f, dtype=torch.float64)
    return W, X


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _aligned(B: torch.Tensor, B_ref: torch.Tensor) -> torch.Tensor:
    """The signs that make B's columns agree with B_ref's (each singular pair is defined up to one)."""
    return torch.sign((B * B_ref).sum(0))


# ----------------------------------------------------------------------------- textbook definitions
def test_svd_is_eckart_young_optimal():
    W, _ = _data()
    A, B = svd_factors(W, 6)
    assert A.shape == (6, 32) and B.shape == (24, 6)
    S = torch.linalg.svdvals(W)
    err = torch.linalg.matrix_norm(W - B @ A)
    assert torch.isclose(err, S[6:].norm(), rtol=1e-10)


def test_full_rank_factors_reconstruct_exactly():
    W, X = _data()
    for A, B in (svd_factors(W, 24), asvd_factors(W, X.abs().mean(0), 24)):
        assert torch.allclose(B @ A, W, atol=1e-10)
    A, B, _ = whitened_svd_factors(W, X.T @ X / X.shape[0], 24)
    assert torch.allclose(B @ A, W, atol=1e-6)


def test_whitening_minimises_output_error_on_the_calibration_data():
    W, X = _data()
    C = X.T @ X / X.shape[0]
    for r in (2, 4, 8):
        A, B, guard_ = whitened_svd_factors(W, C, r)
        err_llm = torch.linalg.matrix_norm(X @ (W - B @ A).T)
        A2, B2 = svd_factors(W, r)
        err_svd = torch.linalg.matrix_norm(X @ (W - B2 @ A2).T)
        A3, B3 = asvd_factors(W, X.abs().mean(0), r)
        err_asvd = torch.linalg.matrix_norm(X @ (W - B3 @ A3).T)
        # SVD-LLM is the optimal rank-r map in the data norm: the best of the three, by a margin
        assert err_llm < 0.8 * err_svd and err_llm <= err_asvd
        # ...and equals the Eckart-Young bound of W C^1/2, with no ridge needed
        L = torch.linalg.cholesky(C)
        bound = torch.linalg.svdvals(W @ L)[r:].norm() * X.shape[0] ** 0.5
        assert torch.isclose(err_llm, bound, rtol=1e-8)
        assert guard_ is None
        # the raw sum with its scale gives the same factors as the mean
        A4, B4, _ = whitened_svd_factors(W, X.T @ X, r, 1.0 / X.shape[0])
        assert torch.allclose(B4 @ A4, B @ A, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(2, 20), in_f=st.integers(2, 20), rank=st.integers(1, 20),
    cond=st.sampled_from([1.0, 1e3, 1e8]), seed=st.integers(0, 10_000),
)
def test_factors_have_their_rank_and_are_finite(out_f, in_f, rank, cond, seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, out_f, in_f)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    X = torch.randn(50, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), in_f, dtype=torch.float64)
    X[:, 0] = 0  # a dead channel
    for A, B in (svd_factors(W, rank), asvd_factors(W, X.abs().mean(0), rank),
                 whitened_svd_factors(W, X.T @ X / 50, rank)[:2]):
        assert A.shape == (rank, in_f) and B.shape == (out_f, rank)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert torch.linalg.matrix_rank(B @ A) <= rank
    A, B = svd_factors(W, rank)  # a random W has full rank: the truncation has exactly ``rank``, and the
    s = torch.linalg.svdvals(W)  # Eckart-Young error
    assert torch.linalg.matrix_rank(B @ A) == rank
    assert torch.isclose(torch.linalg.matrix_norm(W - B @ A), s[rank:].norm(), rtol=1e-8, atol=1e-10)


def _rom(W, X, r, center, space):
    """ROM's factors of W on inputs X, with statistics gathered in ``space`` (out or in)."""
    from rankdown.methods.rom import output_eig, output_moments, rom_factors
    from rankdown.stats import InputStats

    stats = InputStats(W.shape[1] if space == "in" else W.shape[0])
    stats.add(X if space == "in" else X @ W.T)
    second, mean, _ = output_moments(W, stats, space)
    _, V, _ = output_eig(W, second, mean, space, center)
    mu = mean if space == "out" else W @ mean
    return rom_factors(W, None, V[:, :r], mu, center)


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(2, 16), in_f=st.integers(2, 16), rank=st.integers(1, 16),
    cond=st.sampled_from([1.0, 1e4, 1e10]), shift=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 10_000),
)
def test_data_norm_errors_are_ordered_as_theory_says(out_f, in_f, rank, cond, shift, seed):
    """On the calibration data, for well- and ill-conditioned inputs (a dead channel included):
    SVD-LLM's rank-r map is the optimal linear one, so no worse than plain SVD or ASVD; ROM
    uncentered reaches the same optimum from the output side; ROM centered (an affine map) is no
    worse than that. Every factor has its rank and is finite."""
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, out_f, in_f)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), in_f, dtype=torch.float64)
    X = torch.randn(200, in_f, generator=g, dtype=torch.float64) * scale + shift
    X[:, -1] = 0  # a dead channel
    Y = X @ W.T

    def err(A, B, bias=None):
        Yh = X @ (B @ A).T + (0 if bias is None else bias)
        return torch.linalg.matrix_norm(Y - Yh).item()

    A_llm, B_llm, _ = whitened_svd_factors(W, X.T @ X / X.shape[0], rank)
    e_llm = err(A_llm, B_llm)
    e_svd = err(*svd_factors(W, rank))
    e_asvd = err(*asvd_factors(W, X.abs().mean(0), rank))
    # SVD-LLM's Cholesky adds a ridge to a singular correlation (the dead channel): optimal up to it
    tol = 1e-3 * torch.linalg.matrix_norm(Y).item() + 1e-9
    assert e_llm <= e_svd + tol and e_llm <= e_asvd + tol
    for space in ("out", "in"):
        A, B, bias = _rom(W, X, rank, center=False, space=space)
        assert A.shape == (rank, in_f) and B.shape == (out_f, rank) and bias is None
        assert abs(err(A, B) - e_llm) <= tol
        Ac, Bc, bc = _rom(W, X, rank, center=True, space=space)
        assert all(torch.isfinite(t).all() for t in (Ac, Bc, bc))
        assert err(Ac, Bc, bc) <= err(A, B) + tol


# ----------------------------------------------------------------------------- lean == textbook
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_row_blocked_products_equal_the_plain_products(dtype, seed, monkeypatch):
    """gram64, mm64, tmm64, sandwich64 promote W to float64 a block of rows at a time (here 5 rows,
    so several blocks and a ragged last one): the float64 products of the whole promoted W."""
    monkeypatch.setattr(lean, "_BLOCK_BYTES", 8 * 64 * 5)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(37, 64, generator=g).to(dtype)
    W64 = W.to(torch.float64)
    M = torch.randn(64, 5, generator=g, dtype=torch.float64)
    V = torch.randn(37, 5, generator=g, dtype=torch.float64)
    X = torch.randn(80, 64, generator=g, dtype=torch.float64)
    C = X.T @ X / 80
    assert [(a, b.shape[0]) for a, b in lean.row_blocks(W)] == [(a, min(5, 37 - a)) for a in range(0, 37, 5)]
    assert _rel(lean.gram64(W), W64.T @ W64) <= 1e-15  # measured 0
    assert _rel(lean.mm64(W, M), W64 @ M) <= 1e-15  # 0
    assert _rel(lean.tmm64(V, W), V.T @ W64) <= 1e-15  # 0
    assert _rel(lean.sandwich64(W, C), W64 @ C @ W64.T) <= 1e-14  # 8.6e-16
    assert torch.equal(lean.gram64(W), lean.gram64(W).T)


@pytest.mark.parametrize("dim", [7, 300, 1100])
def test_lower_triangle_kernels_equal_the_full_products(dim):
    """zeros_lower + syrk_lower_ + mirror_lower_ is Xᵀ X, summed over batches; sub_outer_lower_ is
    G − u uᵀ on the lower triangle (dim 1100: three 512-wide blocks, each in 256-wide fine ones)."""
    g = torch.Generator().manual_seed(dim)
    X = torch.randn(50, dim, generator=g, dtype=torch.float64)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    G = lean.zeros_lower(dim)
    lean.syrk_lower_(G, X[:20])
    lean.syrk_lower_(G, X[20:])
    low = lean.sub_outer_lower_(G.clone(), u).tril()
    assert _rel(lean.mirror_lower_(G), X.T @ X) <= 3e-15  # measured 2.4e-16
    assert torch.equal(G, G.T)
    assert _rel(low, (X.T @ X - torch.outer(u, u)).tril()) <= 3e-15  # 2.5e-16


@pytest.mark.parametrize("n, block", [(1, 4), (7, 3), (150, 32), (150, 150), (301, 64), (700, 256)])
def test_lower_cholesky_and_solve_equal_lapacks_and_never_read_above_the_diagonal(n, block):
    """Poisoned above the diagonal (NaN), the in-place factor equals LAPACK's Cholesky, the in-place
    solve equals cholesky_solve (with any row blocking, not only the factor's), and nothing above
    the diagonal blocks is written."""
    g = torch.Generator().manual_seed(2)
    B = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    C = B @ B.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    A = C.clone()
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    A[above] = float("nan")
    assert lean.cholesky_lower_(A, block) == 0
    L = torch.linalg.cholesky(C)
    assert _rel(A.tril(), L) <= 2e-14  # measured 2.1e-15
    blocks = torch.arange(n) // block
    outside = blocks[None, :] > blocks[:, None]  # above the diagonal blocks: never touched
    assert torch.isnan(A[outside]).all() and not torch.isnan(A[~outside]).any()
    Y = torch.randn(n, 5, generator=g, dtype=torch.float64)
    X = Y.clone()
    lean.solve_cholesky_(A, X, block=max(1, block // 2 + 1))
    assert _rel(X, torch.cholesky_solve(Y, L)) <= 5e-14  # 4.8e-15
    D = C.clone()
    D[n // 2, n // 2] = -1.0  # not positive definite: LAPACK's info, 1-based
    assert lean.cholesky_lower_(D, block) == int(torch.linalg.cholesky_ex(D)[1]) == n // 2 + 1


@pytest.mark.parametrize("n", [1, 2, 7, 600])
def test_guarded_eigh_is_lapacks_descending_and_in_place_reconstructs(n):
    """Out of place: exactly torch's eigh, reversed (the columns reordered in place by blocks).
    In place (vectors in S's storage, another LAPACK layout): the same eigenvalues and matrix."""
    M = torch.randn(3, n)
    R = M.clone()
    guard._reverse_columns(R, block=4)
    assert torch.equal(R, M.flip(1))
    A = torch.randn(n, n + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    S = A @ A.T
    evals, V, g = guard.guarded_eigh(S)
    lam, Q = torch.linalg.eigh(S)
    assert g is None and torch.equal(evals, lam.flip(0)) and torch.equal(V, Q.flip(1))
    e2, V2, _ = guard.guarded_eigh(S.clone(), inplace=True)
    assert _rel(e2, evals) <= 2e-14  # measured 1.9e-15
    assert _rel((V2 * e2) @ V2.T, S) <= 5e-14  # 4.9e-15


@pytest.mark.parametrize("rows", [40, 9])
def test_psd_root_is_a_root_as_the_textbook_one_is(rows):
    """psd_root: the Cholesky factor when S is definite (40 rows of 16), else the guarded eigen root
    (9 rows: rank 9); either way R Rᵀ = S, as for the textbook Q Λ^½."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(rows, 16, dtype=torch.float64, generator=g)
    S = X.T @ X
    R, _ = guard.psd_root(S)
    assert torch.equal(R, R.tril()) == (rows > 16)  # triangular only when the Cholesky worked
    R_t = textbook.psd_root(S)
    assert _rel(R @ R.T, S) <= 3e-14 and _rel(R_t @ R_t.T, S) <= 3e-14  # measured 2.4e-15 (all three)
    R2, _ = guard.psd_root(S.clone(), inplace=True)
    assert _rel(R2 @ R2.T, S) <= 3e-14


@pytest.mark.parametrize("definite", [True, False])
def test_output_eig_in_equals_the_eigendecomposition_of_w_s_wt(definite):
    """output_eig_in (W S Wᵀ's leading eigen-pairs from (in, in) problems) equals
    textbook.output_eigh, from the Cholesky root or the eigen-root (with its guard) alike."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40 if definite else 9, 16, dtype=torch.float64, generator=g)  # 9 rows: rank 9 < 16
    S = X.T @ X
    W = torch.randn(48, 16, dtype=torch.float64, generator=g)
    lam, U_ref = textbook.output_eigh(W, S)
    P_ref = U_ref[:, :6] @ U_ref[:, :6].T
    for root in (None, guard.psd_root(S), (textbook.psd_root(S), None)):
        s2, U, _ = spectrum.output_eig_in(W, S, 6, root)
        assert _rel(s2[:6], lam[:6]) <= 2e-14  # measured 2.1e-15
        assert float((U @ U.T - P_ref).abs().max()) <= 6e-14  # the same leading subspace: 5.8e-15


@pytest.mark.parametrize("k", [6, 9, 16])
def test_output_eig_in_vectors_are_orthonormal_with_or_without_the_qr(k, monkeypatch):
    """Kept eigenvalues well above 0 (k <= rank 9): ``M p / σ`` is used as it is; a zero one among
    them (k = 16): a QR orthonormalises and completes. Either way orthonormal columns spanning W S
    Wᵀ's leading subspace, and the same as what the QR gives."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 16, dtype=torch.float64, generator=g) * torch.logspace(0, -3, 16, dtype=torch.float64)
    S = X.T @ X
    W = torch.randn(48, 16, dtype=torch.float64, generator=g)
    s2, U, _ = spectrum.output_eig_in(W, S, k)
    assert U.shape == (48, k)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    monkeypatch.setattr(spectrum, "_QR_BELOW", float("inf"))  # always the QR
    _, Q, _ = spectrum.output_eig_in(W, S, k)
    top = min(k, 9)
    assert torch.allclose(U[:, :top] @ U[:, :top].T, Q[:, :top] @ Q[:, :top].T, atol=1e-9)
    ref = textbook.output_eigh(W, S)[1][:, :6]
    assert torch.allclose(U[:, :6] @ U[:, :6].T, ref @ ref.T, atol=1e-8)


@pytest.mark.parametrize("shape", [(24, 32), (48, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_whitened_svd_factors_equal_the_papers_cholesky_route(shape, seed):
    """SVD-LLM from an eigenproblem (out <= in: W C Wᵀ; out > in: the (in, in) route; and from the
    output correlation itself) gives the paper's factors, L = chol(C), SVD of W L, A = Σ^½ Vᵀ L⁻¹,
    column for column up to sign. At full rank the smallest kept σ (C's condition 1e6) costs
    digits: measured 3.6e-10 there, 7.0e-14 at r ≤ 6."""
    W, X = _data(*shape, seed=seed)
    C = X.T @ X / X.shape[0]
    full = min(shape)
    for r in (2, 6, full):
        tol = 4e-9 if r == full else 7e-13
        A_t, B_t = textbook.whitened_svd_factors(W, C, r)
        routes = [whitened_svd_factors(W, C, r)]
        if shape[0] < shape[1]:
            routes.append(spectrum.output_gram_factors(W, W @ C @ W.T, r))
        for A, B, g in routes:
            s = _aligned(B, B_t)
            assert g is None and _rel(B * s, B_t) <= tol and _rel(A * s[:, None], A_t) <= tol


# ----------------------------------------------------------------------------- what makes them lean
@pytest.mark.parametrize("dim", [1, 7, 255, 300, 2048, 5000])
def test_correlation_blocks_cover_the_lower_triangle_once_and_little_above(dim):
    """The statistics write a large correlation on its lower block triangle only (the rest stays
    unwritten, never resident): every entry on or below the diagonal is in exactly one block, and
    above it only the fine diagonal blocks reach (at most _FINE - 1 columns past the diagonal)."""
    count = torch.zeros(dim, dim, dtype=torch.int32)
    for rows, cols in lean.lower_blocks(dim):
        count[rows, cols] += 1
    lower = torch.ones(dim, dim, dtype=torch.bool).tril()
    assert bool((count[lower] == 1).all()) and int(count.max()) == 1
    i, j = torch.nonzero(count.triu(1), as_tuple=True)
    assert i.numel() == 0 or int((j - i).max()) < lean._FINE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux")
def test_release_tail_gives_rows_back_and_keeps_the_rest():
    """MoDeGPT's refit hands back the rows of its Cholesky factor it has finished with while the
    next matrix grows; the memory must really go, and the rows before them must stay intact."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    t = torch.arange(4096 * 4096, dtype=torch.float32).view(4096, 4096)  # 64 MiB: a memory map of its own
    head = t[:1000].clone()
    before = rss()
    lean.release_tail(t, 1000)
    assert before - rss() > 0.8 * 3096 * 4096 * 4
    assert torch.equal(t[:1000], head)  # what the released rows hold is undefined; never read again
    lean.release_tail(t, 4096)  # nothing past the end: a no-op
    lean.release_tail(torch.empty(0, 3), 0)


@pytest.mark.parametrize("n", [3, 600])
def test_in_place_eigh_reads_the_lower_triangle_and_returns_the_vectors_in_its_storage(n):
    """guarded_eigh(inplace=True): the eigen-pairs of the symmetric matrix whose lower triangle S
    holds (NaN above it is never read), the vectors in S's own storage; NaN below is refused."""
    A = torch.randn(n, n + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    full = A @ A.T
    S = full.clone()
    S.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("nan"))
    evals, V, g = guard.guarded_eigh(S, inplace=True)
    assert V.data_ptr() == S.data_ptr() and g is None
    ref = torch.linalg.eigvalsh(full).flip(0)
    assert _rel(evals, ref) <= 1e-13  # measured 8.5e-15
    assert _rel((V * evals) @ V.T, full) <= 5e-14  # 4.9e-15
    bad = full.clone()
    bad[n - 1, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        guard.guarded_eigh(bad, inplace=True)
