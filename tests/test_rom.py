"""ROM (docs/METHODS.md §2): its math against Eckart–Young and SVD-LLM, its allocations on tiny models."""

import pytest
import torch
import transformers as tf

from rankdown.config import RunSettings
from rankdown.allocate import Target, count_params, discarded_energy, global_ranks, last_k_ranks, uniform_ranks
from rankdown.api import compress, find_targets
from rankdown.arch import spec_for
from rankdown.calib import CalibrationData
from rankdown.config import ConfigError
from rankdown.methods.rom import ROMConfig
from rankdown.engine import LayerContext, PlanContext
from rankdown.methods import make_config
from rankdown.linalg import guarded_eigh, whitened_svd_factors
from rankdown.methods.rom import ROM, output_eig, output_moments, rom_factors
from rankdown.nn import LowRankLinear
from rankdown.stats import InputStats
from tiny import _COMMON, outputs, rel_error, tiny_ids, tiny_model, zeroed_error

IDS = tiny_ids(8, 32)


# ----------------------------------------------------------------------------- math on one linear
def _linear_data(out_f=24, in_f=32, n=500, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, generator=g, dtype=torch.float64)
    # a few dominant directions and a non-zero mean, as real activations have
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64) * torch.logspace(1, -2, in_f, dtype=torch.float64)
    X = X + offset * torch.randn(in_f, generator=g, dtype=torch.float64)
    return W, b, X


def _stats(rows: torch.Tensor) -> InputStats:
    s = InputStats(rows.shape[1])
    s.add(rows)
    return s


def _rom(W, b, X, r, center, space):
    """ROM's layer for ``y = W x + b`` on the rows ``X`` (n, in); returns (A, B, bias, eigenvalues)."""
    stats = _stats(X @ W.T if space == "out" else X)
    second, mean, _ = output_moments(W, stats, space)
    evals, V, _ = output_eig(W, second, mean, space, center)
    mu = mean if space == "out" else W @ mean
    A, B, bias = rom_factors(W, b, V[:, :r], mu, center)
    return A, B, bias, evals


def _out_err(W, b, X, A, B, bias) -> float:
    """Squared output error summed over the rows: ``Σ ‖(W x + b) − (B A x + bias)‖²``."""
    y = X @ W.T + (0 if b is None else b)
    y_hat = X @ A.T @ B.T + (0 if bias is None else bias)
    return float((y - y_hat).pow(2).sum())


@pytest.mark.parametrize("shape", [(24, 32), (40, 16)])  # out <= in: output statistics; out > in: input
def test_uncentered_rom_is_eckart_young_on_the_outputs_and_equals_svd_llm(shape):
    W, _, X = _linear_data(*shape)
    n = X.shape[0]
    space = "out" if shape[0] <= shape[1] else "in"
    sv = torch.linalg.svdvals(X @ W.T)  # singular values of the (n, out) output matrix
    for r in (2, 5, 9):
        A, B, bias, evals = _rom(W, None, X, r, center=False, space=space)
        assert A.shape == (r, shape[1]) and B.shape == (shape[0], r) and bias is None
        err = _out_err(W, None, X, A, B, None)
        assert err == pytest.approx(n * float(evals[r:].sum()), rel=1e-8)  # the dropped eigenvalues
        assert err == pytest.approx(float(sv[r:].pow(2).sum()), rel=1e-8)  # optimal rank-r approximation
        A2, B2, _ = whitened_svd_factors(W, X.T @ X / n, r)
        assert err == pytest.approx(_out_err(W, None, X, A2, B2, None), rel=1e-6)


def test_both_statistics_spaces_give_the_same_spectrum_and_subspace():
    W, _, X = _linear_data(24, 32)
    for center in (True, False):
        A_o, B_o, _, ev_o = _rom(W, None, X, 6, center, "out")
        A_i, B_i, _, ev_i = _rom(W, None, X, 6, center, "in")
        assert torch.allclose(ev_o[:24], ev_i[:24], rtol=1e-8, atol=1e-8 * float(ev_o[0]))
        assert torch.allclose(B_o @ B_o.T, B_i @ B_i.T, atol=1e-8)  # same projector V Vᵀ


@pytest.mark.parametrize("with_bias", [False, True])
def test_centered_rom_is_never_worse_and_is_the_best_affine_map(with_bias):
    W, b, X = _linear_data(24, 32)
    b = b if with_bias else None
    n = X.shape[0]
    Y = X @ W.T
    sv_centered = torch.linalg.svdvals(Y - Y.mean(0))
    for r in (1, 3, 8, 16):
        A, B, bias, _ = _rom(W, b, X, r, center=False, space="out")
        err_unc = _out_err(W, b, X, A, B, bias)
        A, B, bias, evals = _rom(W, b, X, r, center=True, space="out")
        err_c = _out_err(W, b, X, A, B, bias)
        assert bias is not None and bias.shape == (24,)
        assert err_c <= err_unc * (1 + 1e-10)
        assert err_c == pytest.approx(n * float(evals[r:].sum()), rel=1e-8)
        assert err_c == pytest.approx(float(sv_centered[r:].pow(2).sum()), rel=1e-8)  # PCA is optimal


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("space", ["out", "in"])
def test_full_rank_reconstructs_outputs_including_the_bias(center, space):
    W, b, X = _linear_data(24, 32) if space == "out" else _linear_data(40, 16)
    out_f = W.shape[0]
    A, B, bias, _ = _rom(W, b, X, min(W.shape), center, space)
    y = X @ W.T + b
    y_hat = X @ A.T @ B.T + bias
    assert torch.allclose(y_hat, y, atol=1e-8 * float(y.abs().max()))
    if space == "out":  # a full basis of the output space: the weight itself comes back
        assert torch.allclose(B @ A, W, atol=1e-9) and torch.allclose(bias, b, atol=1e-9)
    assert B.shape == (out_f, min(W.shape))


def test_eigendecomposition_is_guarded():
    S = torch.diag(torch.tensor([3.0, 1.0, -1e-3], dtype=torch.float64))
    evals, V, guard = guarded_eigh(S)
    assert evals.tolist() == [3.0, 1.0, 0.0]  # descending, negative clamped
    assert guard is not None and guard.kind == "eigenvalue_clamp" and guard.value == pytest.approx(1e-3 / 3)
    _, _, quiet = guarded_eigh(torch.diag(torch.tensor([2.0, 1.0, -1e-15], dtype=torch.float64)))
    assert quiet is None  # rounding noise is not news
    with pytest.raises(FloatingPointError, match="NaN"):
        guarded_eigh(torch.full((2, 2), float("nan"), dtype=torch.float64))


def test_a_linear_that_saw_no_token_falls_back_to_the_weight_svd():
    W, _, _ = _linear_data(24, 32)
    for space in ("out", "in"):
        second, mean, guard = output_moments(W, InputStats(24 if space == "out" else 32), space)
        assert guard is not None and guard.kind == "no_calibration_tokens"
        evals, V, _ = output_eig(W, second, mean, space, center=True)
        assert torch.allclose(evals[:24], torch.linalg.svdvals(W).square(), rtol=1e-8)


# ----------------------------------------------------------------------------- engine additions
def _dense_walk(model, ids=IDS):
    data = CalibrationData(ids, torch.ones_like(ids), "tensor")
    return PlanContext(model, spec_for(model), lambda: data, 4, "cpu", progress=False)


def test_output_statistics_equal_the_input_statistics_pushed_through_the_weight():
    model = tiny_model("qwen2")  # q/k/v have biases, which collect_outputs leaves out
    seen = {}

    def visit(ctx: LayerContext) -> None:
        names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
        s_in, s_out = ctx.collect_inputs(names), ctx.collect_outputs(names)
        for n in names:
            W = ctx.module(n).weight.double()
            seen[(ctx.index, n)] = (s_in[n].n == s_out[n].n,
                                    torch.allclose(s_out[n].gram, W @ s_in[n].gram @ W.T, rtol=1e-4, atol=1e-3),
                                    torch.allclose(s_out[n].mean, W @ s_in[n].mean, atol=1e-5))

    before = outputs(model, IDS)
    _dense_walk(model).walk_dense(visit)
    assert len(seen) == 6 and all(all(v) for v in seen.values())
    assert torch.equal(outputs(model, IDS), before)  # the planning pass leaves the model alone


def test_a_planning_visit_may_not_replace_modules():
    model = tiny_model("llama")

    def visit(ctx: LayerContext) -> None:
        ctx.replace("mlp.down_proj", LowRankLinear(128, 64, 4))

    with pytest.raises(RuntimeError, match="must not replace"):
        _dense_walk(model).walk_dense(visit)


# ----------------------------------------------------------------------------- allocations
@pytest.mark.parametrize("allocation", ["global", "uniform", "last-k"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "mixtral"])
def test_every_allocation_meets_the_ratio_centered_or_not(family, allocation):
    for center in (True, False):
        model = tiny_model(family)
        before = outputs(model, IDS)
        spec_for(model).prepare(model)  # unfuse experts (compress does it too, once)
        had_bias = {t.path: t.bias for t in find_targets(model, spec_for(model))}
        cfg = make_config("rom", ratio=0.25, allocation=allocation, center=center)
        report = compress(model, None, cfg, IDS, run=RunSettings(batch_size=4), progress=False)
        assert abs(report.ratio_achieved - 0.25) <= 0.01
        assert report.params_after == count_params(model)
        rel, zeroed = rel_error(outputs(model, IDS), before), zeroed_error(family, IDS, before)
        assert rel < 0.3 * zeroed, f"relative output error {rel:.4f}, {rel / zeroed:.2f} of zeroed layers'"
        for path, rec in report.modules.items():
            assert rec["bias"] == (center or had_bias.get(path, False))  # centering adds a bias
            extra = rec["out"] if rec["bias"] and not had_bias.get(path, False) else 0
            assert rec["rank"] * (rec["in"] + rec["out"]) + extra < rec["in"] * rec["out"]


def _deep_llama(layers=6):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**_COMMON, "num_hidden_layers": layers})).eval()


def _kept(targets, ranks, with_bias):
    comp = [t for t in targets if t.path in ranks]
    return sum(t.cost(ranks[t.path], with_bias) for t in comp) / sum(t.dense for t in comp)


def test_last_k_compresses_only_the_last_layers_and_picks_the_smallest_k():
    model = _deep_llama(6)
    targets = find_targets(model, spec_for(model))
    total = count_params(model)
    ratio = 0.2
    ranks = last_k_ranks(targets, total, ratio, 1, with_bias=True)
    layers = sorted({t.layer for t in targets if t.path in ranks})
    k = len(layers)
    assert layers == list(range(6 - k, 6)) and 1 < k < 6
    assert all(t.path in ranks for t in targets if t.layer in layers)  # every linear of those layers
    assert _kept(targets, ranks, True) >= 0.33
    try:  # one layer fewer: the ratio is either out of reach or needs a budget below 0.33
        fewer = last_k_ranks(targets, total, ratio, 1, last_k=k - 1, with_bias=True)
        assert _kept(targets, fewer, True) < 0.33
    except ConfigError:
        pass
    # end to end: which modules were replaced
    report = compress(model, None, make_config("rom", ratio=ratio, allocation="last-k"), IDS,
                      progress=False, run=RunSettings(batch_size=4))
    assert abs(report.ratio_achieved - ratio) <= 0.01
    replaced = {int(p.split(".")[2]) for p, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert replaced == set(layers)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_last_k_given_and_the_fallback_to_all_layers(caplog):
    model = _deep_llama(6)
    targets, total = find_targets(model, spec_for(model)), count_params(model)
    ranks = last_k_ranks(targets, total, 0.2, 1, last_k=5)
    assert {t.layer for t in targets if t.path in ranks} == {1, 2, 3, 4, 5}
    with pytest.raises(ConfigError, match="last 1 layers.*last_k >= "):
        last_k_ranks(targets, total, 0.2, 1, last_k=1)
    # a ratio that needs a module budget below 0.33 even over all layers: every layer is compressed
    with caplog.at_level("WARNING", logger="rankdown.allocate"):
        ranks = last_k_ranks(targets, total, 0.65, 1)
    assert "compressing all 6 layers" in caplog.text
    assert {t.layer for t in targets if t.path in ranks} == set(range(6))
    assert _kept(targets, ranks, False) < 0.33
    size = total - sum(t.dense - t.cost(ranks[t.path]) for t in targets)
    assert abs(1 - size / total - 0.65) <= 0.01


def test_global_water_filling_on_synthetic_spectra():
    # two same-shape targets: a steep spectrum (energy in few directions) and a flat one
    steep = torch.tensor([0.5 ** i for i in range(64)], dtype=torch.float64)
    flat = torch.ones(64, dtype=torch.float64)
    targets = [Target("a", 64, 64, False, 0), Target("b", 64, 64, False, 0)]
    total = 2 * 64 * 64 + 10_000
    for ratio in (0.2, 0.3, 0.35):
        ranks = global_ranks(targets, {"a": steep, "b": flat}, total, ratio, 1)
        size = total - sum(t.dense - t.cost(ranks[t.path]) for t in targets if t.path in ranks)
        assert abs(1 - size / total - ratio) <= 0.01
        assert "b" not in ranks or ranks["b"] > ranks["a"]  # the flat spectrum needs the rank
        assert ranks["a"] <= 12  # 2^-12 of the steep energy is left: not worth a parameter more


def test_global_discards_less_energy_than_uniform_at_equal_size_and_predicts_lower_error():
    model = tiny_model("llama")
    spec = spec_for(model)
    targets, total = find_targets(model, spec), count_params(model)
    rom = ROM(ROMConfig(ratio=0.3), RunSettings(batch_size=4))
    spectra = rom.spectra(targets, _dense_walk(model))
    uni = uniform_ranks(targets, total, 0.3, 1, with_bias=True)
    uni_size = total - sum(t.dense - t.cost(uni[t.path], True) for t in targets)
    glo = global_ranks(targets, spectra, total, 1 - uni_size / total, 1, with_bias=True)
    glo_size = total - sum(t.dense - t.cost(glo[t.path], True) for t in targets if t.path in glo)
    assert glo_size <= uni_size
    e_uni = sum(discarded_energy(spectra[t.path], uni[t.path]) for t in targets)
    e_glo = sum(discarded_energy(spectra[t.path], glo.get(t.path)) for t in targets)
    assert e_glo < 0.8 * e_uni
    errs = {}
    for allocation in ("uniform", "global"):
        model = tiny_model("llama")
        before = outputs(model, IDS)
        compress(model, None, make_config("rom", ratio=0.3, allocation=allocation), IDS, progress=False, run=RunSettings(batch_size=4))
        errs[allocation] = (outputs(model, IDS) - before).pow(2).mean().item()
    assert errs["global"] <= errs["uniform"]


def test_uncentered_uniform_rom_matches_svd_llm_on_a_tiny_model():
    # both minimise each linear's output error on the same sequential inputs (Eckart–Young)
    errs = {}
    for method, extra in (("svd-llm", {}), ("rom", {"allocation": "uniform", "center": False})):
        model = tiny_model("llama")
        before = outputs(model, IDS)
        compress(model, None, make_config(method, ratio=0.25, **extra), IDS, progress=False, run=RunSettings(batch_size=4))
        errs[method] = (outputs(model, IDS) - before).pow(2).mean().item()
    assert errs["rom"] == pytest.approx(errs["svd-llm"], rel=1e-3)


# ----------------------------------------------------------------------------- config
def test_config_round_trip_and_errors():
    cfg = make_config("rom", ratio=0.3, allocation="last-k", last_k=3, center=False)
    assert ROMConfig.from_dict(cfg.to_dict()) == cfg
    assert ROMConfig().center is True and ROMConfig().allocation == "auto" and ROMConfig().last_k is None
    for bad, match in (({"allocation": "bottom"}, "global, uniform, last-k"), ({"last_k": 2}, "only used by"),
                       ({"allocation": "last-k", "last_k": 0}, ">= 1"), ({"center": "no"}, "true or false")):
        with pytest.raises(ConfigError, match=match):
            make_config("rom", **bad).validate()
    with pytest.raises(ConfigError, match="cannot be reached"):
        compress(tiny_model("llama"), None, make_config("rom", ratio=0.9), IDS, progress=False)


def test_centered_rom_model_with_added_biases_saves_and_loads_exactly(tmp_path):
    import rankdown

    model = tiny_model("llama")
    report = compress(model, None, make_config("rom", ratio=0.25), IDS, progress=False, run=RunSettings(batch_size=4))
    assert all(rec["bias"] for rec in report.modules.values())  # llama's linears had none
    out = rankdown.save(model, None, tmp_path / "rom", report)
    loaded = rankdown.load(out)
    assert torch.equal(outputs(loaded, IDS), outputs(model, IDS))


def test_the_statistics_pass_runs_each_layer_once_and_hands_on_the_same_outputs(monkeypatch):
    """ROM's spectra pass keeps each layer's outputs from the forward that gathers its statistics:
    one forward per layer and batch (not two), and the next layer sees the same hidden states."""
    model = tiny_model("llama")
    targets = find_targets(model, spec_for(model))
    method = ROM(make_config("rom", ratio=0.3))
    calls = {}

    def count(i):
        def hook(mod, a, kw, out):
            calls[i] = calls.get(i, 0) + 1
        return hook

    handles = [layer.self_attn.register_forward_hook(count(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    kept = method._spectra(targets, _dense_walk(model))
    for h in handles:
        h.remove()
    batches = -(-IDS.shape[0] // 4)
    assert calls == {0: batches, 1: batches}

    # the same spectra when each layer's outputs are computed again instead
    original = LayerContext.collect

    def collect_without_keeping(self, *a, keep_outputs=False, **kw):
        return original(self, *a, **kw)

    monkeypatch.setattr(LayerContext, "collect", collect_without_keeping)
    again = method._spectra(targets, _dense_walk(model))
    assert kept.keys() == again.keys()
    assert all(torch.equal(kept[k], again[k]) for k in kept)


def test_the_spectra_pass_reads_only_the_first_spectra_tokens():
    """--spectra-tokens N: the global allocation's statistics pass reads the first windows holding N
    tokens (here 2 of 8 windows of 32): the same spectra as a pass over those windows alone; 0 reads all."""
    model = tiny_model("llama")
    targets = find_targets(model, spec_for(model))
    capped = ROM(make_config("rom", ratio=0.3, spectra_tokens=64))._spectra(targets, _dense_walk(model))
    first = ROM(make_config("rom", ratio=0.3, spectra_tokens=0))._spectra(targets, _dense_walk(model, IDS[:2]))
    every = ROM(make_config("rom", ratio=0.3, spectra_tokens=0))._spectra(targets, _dense_walk(model))
    assert capped.keys() == first.keys() == every.keys()
    assert all(torch.equal(capped[k], first[k]) for k in capped)
    assert not all(torch.allclose(capped[k], every[k]) for k in capped)
    with pytest.raises(ConfigError, match="spectra_tokens"):
        make_config("rom", spectra_tokens=-1).validate()
