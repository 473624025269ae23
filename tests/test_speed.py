"""Speed measurement: figures consistent with each other and with the settings; no wall-clock targets."""

import copy
import math

import pytest
import torch

from tiny import tiny_model

from rankdown.arch import UnsupportedModelError
from rankdown.config import ConfigError
from rankdown.eval.speed import FIGURES, _run_once, compare_speed, speed

SMALL = dict(batch_size=2, prompt_len=16, new_tokens=5, repeats=2)


def test_speed_figures_positive_finite_and_consistent():
    model = tiny_model("llama")
    res = speed(model, **SMALL)
    for key in FIGURES + ("prefill_ms", "decode_ms", "model_bytes"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["peak_mem_kind"] == "process_rss"
    # the rates and times describe the same runs
    assert res["decode_tok_s"] * res["latency_ms_per_token"] / 1000 == pytest.approx(SMALL["batch_size"])
    assert res["prefill_tok_s"] * res["prefill_ms"] / 1000 == pytest.approx(SMALL["batch_size"] * SMALL["prompt_len"])
    assert res["latency_ms_per_token"] * SMALL["new_tokens"] == pytest.approx(res["decode_ms"])
    # the process holds the model, so its resident set is at least the model's size
    assert res["model_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert res["peak_mem_bytes"] >= res["model_bytes"]
    assert 0 <= res["peak_extra_bytes"] <= res["peak_mem_bytes"]
    assert {k: res[k] for k in SMALL} == SMALL
    assert not model.training


def test_decode_with_cache_matches_greedy_generate():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, tokens = _run_once(model, ids, new_tokens=6)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                             min_new_tokens=7, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    assert tokens.shape == (2, 7)
    assert torch.equal(tokens, ref[:, 12:])


def test_models_take_turns_at_every_call():
    """compare_speed's runs alternate the models at the prefill and at every decode step."""
    from rankdown.eval.speed import _run_lockstep

    models = {"a": tiny_model("llama"), "b": tiny_model("llama")}
    calls = []
    for name, m in models.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res = _run_lockstep(models, ids, 4)
    assert calls == ["a", "b"] * 5
    assert all(p > 0 and d > 0 for p, d in res.values())


def test_compare_speed_ratios_follow_figures():
    dense = tiny_model("llama")
    half = copy.deepcopy(dense)
    with torch.no_grad():  # a smaller model: MLPs of half the width
        for layer in half.model.layers:
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                setattr(mlp, name, torch.nn.Linear(old.in_features, old.out_features // 2, bias=False))
            mlp.down_proj = torch.nn.Linear(mlp.down_proj.in_features // 2, mlp.down_proj.out_features, bias=False)
    res = compare_speed({"dense": dense, "half": half}, **SMALL)
    assert list(res["models"]) == ["dense", "half"] and res["settings"]["repeats"] == 2
    assert all(v == pytest.approx(1.0) for v in res["ratios"]["dense"].values())
    d, h, r = res["models"]["dense"], res["models"]["half"], res["ratios"]["half"]
    assert r["prefill_speedup"] == pytest.approx(h["prefill_tok_s"] / d["prefill_tok_s"])
    assert r["decode_speedup"] == pytest.approx(h["decode_tok_s"] / d["decode_tok_s"])
    assert r["latency_ratio"] == pytest.approx(1 / r["decode_speedup"])
    mlp_bytes = 2 * 3 * 64 * 64 * 4  # 2 layers x 3 linears x (64 x 64 removed) x fp32
    assert h["model_bytes"] == d["model_bytes"] - mlp_bytes
    assert r["model_bytes_ratio"] == pytest.approx(h["model_bytes"] / d["model_bytes"])


@pytest.mark.parametrize("statistic", ["min", "median"])
def test_figures_are_the_fastest_run_or_the_median(monkeypatch, statistic):
    """The repeats of a run become one figure by the statistic asked; the other is kept beside it."""
    import rankdown.eval.speed as sp

    times = iter([(9.0, 9.0), (3.0, 6.0), (1.0, 8.0), (2.0, 2.0)])  # warm-up, then 3 repeats
    monkeypatch.setattr(sp, "_run_lockstep", lambda models, ids, n: {name: next(times) for name in models})
    res = sp.compare_speed({"m": tiny_model("llama")}, batch_size=1, prompt_len=4, new_tokens=2, repeats=3,
                           statistic=statistic)
    f = res["models"]["m"]
    want = {"min": (1.0, 2.0), "median": (2.0, 6.0)}
    other = "median" if statistic == "min" else "min"
    assert (f["prefill_ms"], f["decode_ms"]) == tuple(1000 * t for t in want[statistic])
    assert (f[f"prefill_ms_{other}"], f[f"decode_ms_{other}"]) == tuple(1000 * t for t in want[other])
    assert f["prefill_tok_s"] == 4 / want[statistic][0] and res["settings"]["statistic"] == statistic
    with pytest.raises(ConfigError, match="statistic must be one of min, median"):
        sp.compare_speed({"m": tiny_model("llama")}, statistic="mean")


def test_bad_settings_and_encoders_are_user_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        speed(tiny_model("llama"), batch_size=0)
    with pytest.raises(ConfigError, match="no model"):
        compare_speed({})
    with pytest.raises(UnsupportedModelError, match="language-model head"):
        speed(tiny_model("bert"), prompt_len=8, new_tokens=2, repeats=1)
