"""The baselines' factorisations against their defining properties."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankdown.methods.linalg import asvd_factors, guarded_cholesky, svd_factors, whitened_svd_factors


def _data(out_f=24, in_f=32, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    # inputs with a few dominant directions, as real activations have
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) * torch.logspace(1, -2, in_f, dtype=torch.float64)
    return W, X


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
        A, B, guard = whitened_svd_factors(W, C, r)
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
        assert guard is None
        # the paper's route (whitening by Cholesky, SVD of W L) gives the same factors, side by side
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        B_paper = U[:, :r] * S[:r].sqrt()
        A_paper = torch.linalg.solve_triangular(L, S[:r].sqrt()[:, None] * Vh[:r], upper=False, left=False)
        signs = torch.sign((B * B_paper).sum(0))  # each singular pair is defined up to its sign
        assert torch.allclose(B * signs, B_paper, atol=1e-8) and torch.allclose(A * signs[:, None], A_paper, atol=1e-8)
        # the raw sum with its scale gives the same factors as the mean
        A4, B4, _ = whitened_svd_factors(W, X.T @ X, r, 1.0 / X.shape[0])
        assert torch.allclose(B4 @ A4, B @ A, atol=1e-10)


def test_cholesky_guard_grows_on_singular_input():
    C = torch.zeros(5, 5, dtype=torch.float64)
    C[0, 0] = 1.0  # rank one: plain Cholesky fails
    L, guard = guarded_cholesky(C)
    assert torch.isfinite(L).all()
    assert torch.allclose(L @ L.T, C + guard.value * torch.eye(5, dtype=torch.float64))


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


def test_lean_nystrom_equals_the_textbook_formulas():
    """MoDeGPT's Type I works from one in-place Cholesky factor (memory); it must give what the
    formulas give: scores diag(C (C + λI)⁻¹) from an eigendecomposition, then the ridge refit by a
    direct solve; also from the raw sum with its scale, consumed."""
    from rankdown.methods.modegpt import nystrom_mlp, ridge_leverage

    g = torch.Generator().manual_seed(1)
    n, d, k, rows = 300, 40, 170, 900
    H = torch.relu(torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.logspace(1, -3, n, dtype=torch.float64))
    H[:, 7] = 0.0
    W = torch.randn(d, n, generator=g)  # float32, as a model's weight
    C = H.T @ H / rows
    lam = 1e-3 * float(C.diagonal().mean())
    evals, Q = torch.linalg.eigh(C)
    scores = (Q.square() * (evals / (evals + lam))[None, :]).sum(1)
    assert torch.allclose(ridge_leverage(C, lam), scores, atol=1e-10)
    S_ref = torch.sort(torch.topk(scores, k).indices).values
    W64 = W.to(torch.float64)
    X_ref = torch.linalg.solve(C[S_ref][:, S_ref] + lam * torch.eye(k, dtype=torch.float64), C[S_ref] @ W64.T).T
    S, X, guard = nystrom_mlp(W, C, k, 1e-3, block=64)
    assert torch.equal(S, S_ref) and torch.allclose(X, X_ref, rtol=1e-8, atol=1e-10)
    assert guard.value == pytest.approx(lam)
    raw = H.T @ H
    S2, X2, guard2 = nystrom_mlp(W, raw, k, 1e-3, scale=1.0 / rows, consume=True, block=64)
    assert torch.equal(S2, S_ref) and torch.allclose(X2, X_ref, rtol=1e-8, atol=1e-10)
    assert guard2.value == pytest.approx(lam) and not torch.equal(raw, H.T @ H)  # consumed
    # from statistics that hand over only their lower triangle (the rest never written): poisoned
    # above the diagonal, the same result, and the statistics let go of it
    from rankdown.stats import InputStats

    stats = InputStats(n, gram=True)
    stats.add(H, rows=128)
    lower = stats.take_gram(lower=True)
    assert stats._gram is None
    with pytest.raises(ValueError, match="no correlation"):
        stats.second_moment
    assert torch.allclose(lower.tril(), (H.T @ H).tril(), rtol=1e-12, atol=1e-9)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    lower[upper] = float("nan")
    S4, X4, _ = nystrom_mlp(W, lower, k, 1e-3, scale=1.0 / rows, consume=True, block=64)
    assert torch.equal(S4, S_ref) and torch.allclose(X4, X_ref, rtol=1e-8, atol=1e-10)
    seen = []  # the channels are handed out once, as soon as they are chosen, and change nothing
    S5, X5, _ = nystrom_mlp(W, C, k, 1e-3, block=64, on_channels=seen.append)
    assert len(seen) == 1 and torch.equal(seen[0], S_ref) and torch.equal(S5, S_ref) and torch.equal(X5, X)
    S3, X3, _ = nystrom_mlp(W, C, n, 1e-3, block=64)  # every channel kept: the whole correlation refactorised
    X3_ref = torch.linalg.solve(C + lam * torch.eye(n, dtype=torch.float64), C @ W64.T).T
    assert torch.equal(S3, torch.arange(n)) and torch.allclose(X3, X3_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n, block", [(1, 4), (7, 3), (150, 32), (150, 150), (301, 64)])
def test_lower_cholesky_and_solve_never_read_above_the_diagonal(n, block):
    """MoDeGPT's refit factorises in place and solves with the factor where it lies, so that the
    never-written half of a correlation stays out of memory: poisoned above the diagonal (NaN),
    the factor and the solve equal LAPACK's, and nothing above the diagonal blocks is written."""
    from rankdown.methods.linalg import cholesky_lower_, solve_cholesky_

    g = torch.Generator().manual_seed(2)
    B = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    C = B @ B.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    A = C.clone()
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    A[above] = float("nan")
    assert cholesky_lower_(A, block) == 0
    L = torch.linalg.cholesky(C)
    assert torch.allclose(A.tril(), L, rtol=1e-10, atol=1e-12)
    blocks = torch.arange(n) // block
    outside = blocks[None, :] > blocks[:, None]  # above the diagonal blocks: never touched
    assert torch.isnan(A[outside]).all() and not torch.isnan(A[~outside]).any()
    Y = torch.randn(n, 5, generator=g, dtype=torch.float64)
    X = Y.clone()
    solve_cholesky_(A, X, block=max(1, block // 2 + 1))  # any row blocking, not only the factor's
    assert torch.allclose(X, torch.linalg.solve(C, Y), rtol=1e-8, atol=1e-10)
    D = C.clone()
    D[n // 2, n // 2] = -1.0  # not positive definite: LAPACK's info, 1-based
    assert cholesky_lower_(D, block) == int(torch.linalg.cholesky_ex(D)[1]) == n // 2 + 1


@pytest.mark.parametrize("n", [1, 2, 7, 600])
def test_guarded_eigh_orders_in_place_and_reconstructs(n):
    """Eigenvectors reordered in place by blocks (no second (d, d) copy): still the descending
    eigen-pairs of S, read from its lower triangle."""
    from rankdown.methods.linalg import _reverse_columns, guarded_eigh

    M = torch.randn(3, n)
    R = M.clone()
    _reverse_columns(R, block=4)
    assert torch.equal(R, M.flip(1))
    A = torch.randn(n, n + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    S = A @ A.T
    evals, V, guard = guarded_eigh(S)
    assert guard is None and bool((evals[:-1] >= evals[1:]).all())
    assert torch.allclose((V * evals) @ V.T, S, rtol=1e-10, atol=1e-9 * float(evals[0]))


@pytest.mark.parametrize("definite", [True, False])
def test_output_spectrum_is_the_same_from_a_cholesky_or_a_symmetric_root(definite):
    """output_eig_in takes any R with R Rᵀ = S: Cholesky when S is definite, the eigen-root (with
    its guard) when it is singular; both give W S Wᵀ's leading eigen-pairs."""
    from rankdown.methods.linalg import output_eig_in, psd_factor, psd_root

    g = torch.Generator().manual_seed(3)
    X = torch.randn(40 if definite else 9, 16, dtype=torch.float64, generator=g)  # 9 rows: rank 9 < 16
    S = X.T @ X
    W = torch.randn(48, 16, dtype=torch.float64, generator=g)
    L, guard = psd_factor(S)
    assert torch.allclose(L @ L.T, S, atol=1e-10)
    assert torch.equal(L, L.tril()) == definite  # triangular only when the Cholesky worked
    ref = torch.linalg.eigh(W @ S @ W.T)
    top = ref.eigenvalues.flip(0)[:6]
    for root in ((L, guard), psd_root(S)):
        s2, U, _ = output_eig_in(W, None, 6, root)
        assert torch.allclose(s2[:6], top, rtol=1e-9)
        P = U @ U.T  # the same leading subspace (well separated eigenvalues)
        V = ref.eigenvectors.flip(1)[:, :6]
        assert torch.allclose(P, V @ V.T, atol=1e-8)


@pytest.mark.parametrize("k", [6, 9, 16])
def test_output_eig_in_vectors_are_orthonormal_with_or_without_the_qr(k, monkeypatch):
    """Kept eigenvalues well above 0 (k <= rank 9): ``M p / σ`` is used as it is; a zero one among
    them (k = 16): a QR orthonormalises and completes. Either way orthonormal columns spanning W S
    Wᵀ's leading subspace, and the same as what the QR gives."""
    from rankdown.methods import linalg

    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 16, dtype=torch.float64, generator=g) * torch.logspace(0, -3, 16, dtype=torch.float64)
    S = X.T @ X
    W = torch.randn(48, 16, dtype=torch.float64, generator=g)
    s2, U, _ = linalg.output_eig_in(W, S, k)
    assert U.shape == (48, k)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    monkeypatch.setattr(linalg, "_QR_BELOW", float("inf"))  # always the QR
    _, Q, _ = linalg.output_eig_in(W, S, k)
    top = min(k, 9)
    assert torch.allclose(U[:, :top] @ U[:, :top].T, Q[:, :top] @ Q[:, :top].T, atol=1e-9)
    ref = torch.linalg.eigh(W @ S @ W.T).eigenvectors.flip(1)[:, :6]
    assert torch.allclose(U[:, :6] @ U[:, :6].T, ref @ ref.T, atol=1e-8)


@pytest.mark.parametrize("d", [1, 7, 513, 2048, 4500])
def test_block_triangle_gram_equals_the_full_product(d):
    """InputStats and gram64 sum one block triangle of Xᵀ X and mirror it: the same symmetric
    matrix as the full product, also when read between additions."""
    from rankdown.methods.linalg import gram64
    from rankdown.stats import InputStats

    g = torch.Generator().manual_seed(d)
    X = torch.randn(300, d, generator=g)
    s = InputStats(d)
    s.add(X[:100])
    first = s.gram.clone()
    s.add(X[100:], rows=64)
    X64 = X.double()
    assert torch.allclose(first, X64[:100].T @ X64[:100], rtol=1e-12, atol=1e-10)
    assert torch.allclose(s.gram, X64.T @ X64, rtol=1e-12, atol=1e-10)
    assert torch.equal(s.gram, s.gram.T)
    assert torch.allclose(gram64(X), X64.T @ X64, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dim", [1, 7, 255, 300, 2048, 5000])
def test_correlation_blocks_cover_the_lower_triangle_once_and_little_above(dim):
    """The statistics write a large correlation on its lower block triangle only (the rest stays
    unwritten, never resident): every entry on or below the diagonal is in exactly one block, and
    above it only the fine diagonal blocks reach (at most _FINE - 1 columns past the diagonal)."""
    from rankdown.stats import _FINE, _lower_blocks, mirror_lower_, syrk_lower_, zeros_lower

    count = torch.zeros(dim, dim, dtype=torch.int32)
    for rows, cols in _lower_blocks(dim):
        count[rows, cols] += 1
    lower = torch.ones(dim, dim, dtype=torch.bool).tril()
    assert bool((count[lower] == 1).all()) and int(count.max()) == 1
    i, j = torch.nonzero(count.triu(1), as_tuple=True)
    assert i.numel() == 0 or int((j - i).max()) < _FINE
    if dim <= 300:
        g = torch.Generator().manual_seed(dim)
        X = torch.randn(40, dim, generator=g, dtype=torch.float64)
        G = zeros_lower(dim)
        syrk_lower_(G, X[:25])
        syrk_lower_(G, X[25:])
        assert torch.allclose(mirror_lower_(G), X.T @ X, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux")
def test_release_tail_gives_rows_back_and_keeps_the_rest():
    """MoDeGPT's refit hands back the rows of its Cholesky factor it has finished with while the
    next matrix grows; the memory must really go, and the rows before them must stay intact."""
    from rankdown import heap

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    t = torch.arange(4096 * 4096, dtype=torch.float32).view(4096, 4096)  # 64 MiB: a memory map of its own
    head = t[:1000].clone()
    before = rss()
    heap.release_tail(t, 1000)
    assert before - rss() > 0.8 * 3096 * 4096 * 4
    assert torch.equal(t[:1000], head)  # what the released rows hold is undefined; never read again
    heap.release_tail(t, 4096)  # nothing past the end: a no-op
    heap.release_tail(torch.empty(0, 3), 0)


def _poison_unwritten(G: torch.Tensor) -> torch.Tensor:
    """NaN wherever the statistics' block triangle was never written (as fresh memory may hold)."""
    from rankdown.stats import _lower_blocks

    written = torch.zeros(G.shape, dtype=torch.bool)
    for rows, cols in _lower_blocks(G.shape[0]):
        written[rows, cols] = True
    G[~written] = float("nan")
    return written


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dim", [5, 700])
def test_moment_taken_in_place_equals_the_copies_and_writes_only_the_lower_blocks(center, dim):
    """take_moment forms C/n (− μμᵀ) in the correlation's storage: equal on the lower triangle to
    the copies ROM made before, nothing written above the statistics' blocks, the reference dropped."""
    from rankdown.stats import InputStats

    g = torch.Generator().manual_seed(dim)
    X = torch.randn(900, dim, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3, dim) + 0.5
    stats = InputStats(dim)
    stats.add(X)
    ref = X.T @ X / X.shape[0]
    if center:
        ref = ref - torch.outer(X.mean(0), X.mean(0))
    written = _poison_unwritten(stats._gram)
    M = stats.take_moment(center)
    low = torch.ones(dim, dim, dtype=torch.bool).tril()
    assert torch.allclose(M[low], ref[low], rtol=1e-10, atol=1e-12)
    assert bool(M[~written].isnan().all())  # the unwritten part untouched
    with pytest.raises(ValueError, match="no correlation"):
        stats.take_moment(center)


@pytest.mark.parametrize("n", [3, 600])
def test_in_place_eigh_reads_the_lower_triangle_and_returns_the_vectors_in_its_storage(n):
    """guarded_eigh(inplace=True): the eigen-pairs of the symmetric matrix whose lower triangle S
    holds (NaN above it is never read), the vectors in S's own storage; NaN below is refused."""
    from rankdown.methods.linalg import guarded_eigh

    A = torch.randn(n, n + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    full = A @ A.T
    S = full.clone()
    S.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("nan"))
    evals, V, guard = guarded_eigh(S, inplace=True)
    assert V.data_ptr() == S.data_ptr() and guard is None
    ref = torch.linalg.eigvalsh(full).flip(0)
    assert torch.allclose(evals, ref, rtol=1e-10, atol=1e-10 * float(ref[0]))
    assert torch.allclose((V * evals) @ V.T, full, rtol=1e-10, atol=1e-9 * float(ref[0]))
    bad = full.clone()
    bad[n - 1, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        guarded_eigh(bad, inplace=True)


@pytest.mark.parametrize("space", ["out", "in"])
@pytest.mark.parametrize("center", [False, True])
def test_rom_factors_from_consumed_statistics_equal_those_from_copies(space, center):
    """ROM's layer path takes the statistics' correlation and decomposes it in place: the same
    eigenvalues and output subspace as the copying path (output_moments + output_eig)."""
    from rankdown.methods.rom import input_root, output_eig, output_moments
    from rankdown.stats import InputStats

    g = torch.Generator().manual_seed(7)
    out_f, in_f = (24, 40) if space == "out" else (56, 24)
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    X = torch.randn(300, in_f, dtype=torch.float64, generator=g) * torch.linspace(0.2, 2, in_f) + 0.3
    d = out_f if space == "out" else in_f
    a, b = InputStats(d), InputStats(d)
    for s in (a, b):
        s.add(X @ W.T if space == "out" else X)
    second, mean, _ = output_moments(W, a, space)
    ev_ref, V_ref, _ = output_eig(W, second, mean, space, center, 10)
    taken, mean, _ = output_moments(W, b, space, take=True)
    _poison_unwritten(taken)
    if space == "in":
        ev, V, _ = output_eig(W, None, mean, space, center, 10, input_root(taken, mean, center, inplace=True))
    else:
        ev, V, _ = output_eig(W, taken, mean, space, center, 10, inplace=True)
    assert torch.allclose(ev[:10], ev_ref[:10], rtol=1e-9)
    assert torch.allclose(V @ V.T, V_ref @ V_ref.T, atol=1e-8)
