"""KFAC-SVD (docs/METHODS.md §7): its factorisation against plain SVD and SVD-LLM in the K-FAC norm,
the loss-unit allocation, the gradient rows it sums, the guard, and a save/load round trip."""

import pytest
import torch

import rankdown
from rankdown.allocate import count_params
from rankdown.api import compress
from rankdown.config import ConfigError, RunSettings
from rankdown.linalg import svd_factors, whitened_svd_factors
from rankdown.methods import make_config
from rankdown.methods import kfac as kfac_mod
from rankdown.methods.kfac import kept_grad_rows, kfac_error, kfac_factors, shrunk_root
from tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)
RUN = RunSettings(batch_size=4)


@pytest.mark.parametrize("allocation", ["fisher", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_parameter_count_meets_the_ratio(allocation, ratio):
    model = tiny_model("llama")
    before = count_params(model)
    report = compress(model, None, make_config("kfac", ratio=ratio, allocation=allocation), IDS, progress=False, run=RUN)
    assert report.params_before == before and report.params_after == count_params(model)
    assert abs(report.ratio_achieved - ratio) <= 0.01
    by_shape: dict[tuple, set] = {}
    for p, r in report.modules.items():
        mod = model.get_submodule(p)
        by_shape.setdefault((mod.out_features, mod.in_features), set()).add(r["rank"])
    one_each = all(len(v) == 1 for v in by_shape.values()) and len(report.modules) == 14
    assert one_each == (allocation == "uniform")  # uniform: one rank per shape; fisher reads the loss


def _synthetic(out_f: int, in_f: int, seed: int = 0):
    """A and G of anisotropic inputs and gradients (float64), and a tiny model's weight."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, in_f, generator=g, dtype=torch.float64) @ torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    X *= torch.logspace(0, -2, in_f, dtype=torch.float64)
    D = torch.randn(400, out_f, generator=g, dtype=torch.float64) * torch.logspace(1, -1, out_f, dtype=torch.float64)
    return X.T @ X / 400, D.T @ D / 400


@pytest.mark.parametrize("name, rank", [("self_attn.q_proj", 8), ("mlp.up_proj", 16), ("mlp.down_proj", 12)])
def test_factorisation_minimises_the_kfac_error(name, rank):
    """On a tiny model's weight with a synthetic A and G: the K-FAC error tr(G ΔW A ΔWᵀ) of kfac's
    factors equals the sum of the dropped whitened σ² and is below plain SVD's and SVD-LLM's."""
    W = tiny_model("llama").model.layers[0].get_submodule(name).weight.detach()
    A, G = _synthetic(*W.shape)
    (LA, ga), (LG, gg) = shrunk_root(A, 0.0), shrunk_root(G, 0.0)
    assert ga is None and gg is None
    Af, Bf, s2 = kfac_factors(W, LA, LG, rank)
    errs = {"kfac": kfac_error(W, Bf @ Af, A, G)}
    a, b = svd_factors(W.double(), rank)
    errs["svd"] = kfac_error(W, b @ a, A, G)
    a, b, _ = whitened_svd_factors(W, A, rank)
    errs["svd-llm"] = kfac_error(W, b @ a, A, G)
    assert errs["kfac"] == pytest.approx(float(s2[rank:].sum()), rel=1e-8)
    assert errs["kfac"] < 0.9 * min(errs["svd"], errs["svd-llm"]), errs
    # and no rank-r matrix near it does better (a local check of optimality)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        pa = Af + 1e-3 * torch.randn(Af.shape, generator=g, dtype=torch.float64) * Af.abs().mean()
        assert kfac_error(W, Bf @ pa, A, G) >= errs["kfac"]


def test_shrinkage_keeps_the_trace_and_a_singular_matrix_gets_a_reported_ridge():
    A, _ = _synthetic(4, 10)
    L, guard = shrunk_root(A, 0.3)
    S = L @ L.T
    assert guard is None and torch.trace(S) == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert torch.allclose(S, 0.7 * A + 0.3 * A.diagonal().mean() * torch.eye(10, dtype=torch.float64))
    x = torch.randn(3, 10, dtype=torch.float64)
    L, guard = shrunk_root(x.T @ x, 0.0)  # rank 3 of 10
    assert guard is not None and guard.kind == "ridge" and torch.isfinite(L).all()
    L, guard = shrunk_root(torch.zeros(5, 5), 0.1)
    assert guard.kind == "no_statistics" and torch.equal(L, torch.eye(5, dtype=torch.float64))


def test_gradient_rows_are_trimmed_masked_and_clipped():
    g = torch.ones(2, 40, 3)
    g[0, 10] *= 1000.0  # an outlier token
    g[0, 11] = 0.0  # a token without gradient stays zero
    g[0, 0] = 1e6  # trimmed: counts for nothing
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :8] = False  # left padding: 32 real tokens
    rows = kept_grad_rows(g, mask, 0.125, 0.0)
    assert rows.shape == (30 + 24, 3)  # 40 real: 5 dropped at each end; 32 real: 4 at each end
    rows = kept_grad_rows(g, mask, 0.125, 10.0)
    norms = rows[:30].norm(dim=1)
    mean = float((1000 + 28) * 3**0.5 / 29)  # of the 29 live kept tokens of sequence 0
    assert float(norms[5]) == pytest.approx(10 * mean, rel=1e-6)  # the outlier, clipped at 10x its sequence's mean
    assert float(norms[6]) == 0.0  # no gradient: left at zero
    assert float(norms[0]) == pytest.approx(mean / 10, rel=1e-6)  # small ones raised to a tenth of it
    assert torch.allclose(rows[30:], torch.ones(24, 3))  # sequence 1: all alike, nothing clipped
    assert torch.equal(kept_grad_rows(g, None, 0.0, 0.0), g.reshape(-1, 3))


def test_the_allocation_puts_more_rank_where_the_gradient_is_larger(monkeypatch):
    """Scaling one linear's gradient covariance by 100 (its loss cost per direction) gives it more
    rank, and the budget is still met."""
    target = "model.layers.1.mlp.up_proj"
    ranks = {}
    real = kfac_mod.kfac_statistics
    for scale in (1.0, 100.0):
        def scaled(*args, **kw):
            ins, grads = real(*args, **kw)
            grads[target]._gram.mul_(scale)
            return ins, grads
        monkeypatch.setattr(kfac_mod, "kfac_statistics", scaled)
        report = compress(tiny_model("llama"), None, make_config("kfac", ratio=0.3), IDS, progress=False, run=RUN)
        assert abs(report.ratio_achieved - 0.3) <= 0.01
        ranks[scale] = {p: r["rank"] for p, r in report.modules.items()}
    assert ranks[100.0].get(target, 10**9) > ranks[1.0][target]  # (or left dense)


def test_sequential_inputs_and_the_ridge_guard():
    """input_stats sequential measures A on the compressed upstream (another model than dense A);
    without shrinkage, 32 tokens for 64 input dimensions need a ridge, which is reported."""
    got = {}
    for stats in ("dense", "sequential"):
        model = tiny_model("llama")
        compress(model, None, make_config("kfac", ratio=0.3, input_stats=stats), IDS, progress=False, run=RUN)
        got[stats] = outputs(model, IDS)
    assert not torch.allclose(got["dense"], got["sequential"])
    model = tiny_model("llama")
    report = compress(model, None, make_config("kfac", ratio=0.3, input_shrinkage=0.0), tiny_ids(1, 32),
                      progress=False, run=RUN)
    assert report.guards and all("ridge" in g["kind"] for g in report.guards.values())
    assert torch.isfinite(outputs(model, IDS)).all()


def test_save_and_load_give_identical_logits(tmp_path):
    model = tiny_model("qwen2")  # biased q/k/v
    report = compress(model, None, make_config("kfac", ratio=0.25), IDS, progress=False, run=RUN)
    folder = rankdown.save(model, None, tmp_path / "kfac", report)
    loaded = rankdown.load(folder)
    assert count_params(loaded) == count_params(model)
    assert torch.equal(outputs(loaded, IDS), outputs(model, IDS))


@pytest.mark.parametrize("bad", [{"input_shrinkage": 1.0}, {"grad_shrinkage": -0.1}, {"grad_trim": 0.5},
                                 {"grad_clip": 0.5}, {"input_stats": "both"}, {"allocation": "global"}])
def test_bad_settings_are_refused_with_the_range(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
        make_config("kfac", **bad)
