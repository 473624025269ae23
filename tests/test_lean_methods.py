"""The methods' memory-lean paths against the copies and formulas they replace: InputStats' block
triangle and in-place moments, ROM from consumed statistics, MoDeGPT's Nyström refit from one
in-place Cholesky (its kernels: tests/test_linalg.py)."""

import pytest
import torch

from rankdown.linalg import gram64, lower_blocks
from rankdown.methods.modegpt import nystrom_mlp, ridge_leverage
from rankdown.methods.rom import input_root, output_eig, output_moments
from rankdown.stats import InputStats


@pytest.mark.parametrize("d", [1, 7, 513, 2048, 4500])
def test_block_triangle_gram_equals_the_full_product(d):
    """InputStats and gram64 sum one block triangle of Xᵀ X and mirror it: the same symmetric
    matrix as the full product, also when read between additions."""
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


def _poison_unwritten(G: torch.Tensor) -> torch.Tensor:
    """NaN wherever the statistics' block triangle was never written (as fresh memory may hold)."""
    written = torch.zeros(G.shape, dtype=torch.bool)
    for rows, cols in lower_blocks(G.shape[0]):
        written[rows, cols] = True
    G[~written] = float("nan")
    return written


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dim", [5, 700])
def test_moment_taken_in_place_equals_the_copies_and_writes_only_the_lower_blocks(center, dim):
    """take_moment forms C/n (− μμᵀ) in the correlation's storage: equal on the lower triangle to
    the copies ROM made before, nothing written above the statistics' blocks, the reference dropped."""
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


def test_lean_nystrom_equals_the_textbook_formulas():
    """MoDeGPT's Type I works from one in-place Cholesky factor (memory); it must give what the
    formulas give: scores diag(C (C + λI)⁻¹) from an eigendecomposition, then the ridge refit by a
    direct solve; also from the raw sum with its scale, consumed."""
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


@pytest.mark.parametrize("space", ["out", "in"])
@pytest.mark.parametrize("center", [False, True])
def test_rom_factors_from_consumed_statistics_equal_those_from_copies(space, center):
    """ROM's layer path takes the statistics' correlation and decomposes it in place: the same
    eigenvalues and output subspace as the copying path (output_moments + output_eig)."""
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
