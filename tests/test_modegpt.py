"""MoDeGPT (docs/METHODS.md §3): its three decompositions, the reduced modules, allocation, save/load,
numerical safety on nearly singular statistics, and quality on the reference model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rankdown
from rankdown.config import RunSettings
from rankdown.allocate import count_params
from rankdown.api import compress
from rankdown.arch import UnsupportedModelError
from rankdown.config import ConfigError
from rankdown.methods import make_config
from rankdown.methods.modegpt import kept_dims, nystrom_mlp, psd_sqrt, qk_scores, ridge_leverage, vo_factors
from rankdown.methods.modegpt_alloc import QK_SHARE, block_influence_sparsity, spread
from rankdown.nn.portable import ReducedAttention, ReducedLinear
from tiny import outputs, rel_error, tiny_ids, tiny_model, zeroed_error

IDS = tiny_ids(8, 32)
SUPPORTED = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3", "opt", "smollm3", "mixtral", "qwen2_moe",
             "qwen3_moe", "phi3", "phi4", "gemma2", "olmo2", "gpt2", "gpt_neox"]
QK_NORM = {"qwen3", "gemma3", "qwen3_moe", "olmo2"}  # q/k norms over the head: query/key kept whole
QK_WHOLE = QK_NORM | {"phi4", "gpt_neox"}  # and RoPE on part of each head
F64 = torch.float64


def _data(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(0.5, -1.5, d, dtype=F64)
    return X, g


# ----------------------------------------------------------------------------- the decompositions
def test_psd_sqrt_and_its_floor():
    X, _ = _data()
    C = X.T @ X / len(X)
    h, ih, guard = psd_sqrt(C)
    assert torch.allclose(h @ h, C, atol=1e-10) and torch.allclose(h @ ih, torch.eye(24, dtype=F64), atol=1e-8)
    assert guard is None
    C[:, 3] = C[3, :] = 0.0  # a dead input dimension: floored, reported, finite
    h, ih, guard = psd_sqrt(C)
    assert guard is not None and guard.kind == "eigenvalue_floor" and torch.isfinite(ih).all()


def test_nystrom_drops_dead_channels_and_refits_down():
    X, g = _data(d=32)
    H = torch.relu(X @ torch.randn(32, 48, generator=g, dtype=F64))  # (n, 48) intermediate activations
    H[:, [5, 17]] = 0.0  # dead channels
    W = torch.randn(16, 48, generator=g, dtype=F64)
    C = H.T @ H / len(H)
    s = ridge_leverage(C, 1e-2 * float(C.diagonal().mean()))
    assert float(s[5]) == pytest.approx(0.0, abs=1e-12) and float(s.max()) < 1.0
    S, W_new, guard = nystrom_mlp(W, C, 30, 1e-2)
    assert 5 not in S.tolist() and 17 not in S.tolist() and guard.kind == "nystrom_ridge"
    err = (H @ W.T - H[:, S] @ W_new.T).pow(2).sum()
    err_select = (H @ W.T - H[:, S] @ W[:, S].T).pow(2).sum()  # keeping the columns without re-fitting
    assert err < 0.5 * err_select
    S, W_all, _ = nystrom_mlp(W, C, 48, 1e-8)  # everything kept, tiny ridge: down almost unchanged on the data
    assert (H @ W.T - H @ W_all.T).pow(2).sum() < 1e-6 * (H @ W.T).pow(2).sum()


def test_qk_scores_sum_rope_pairs_and_query_groups():
    dq = torch.rand(4, 8, dtype=F64)
    dk = torch.rand(2, 8, dtype=F64)
    s = qk_scores(dq, dk, rope=True)
    assert s.shape == (2, 4)
    per_dim = (dq.sqrt()[:2] * dk.sqrt()[0]).sum(0)  # query heads 0, 1 read kv head 0
    assert torch.allclose(s[0], per_dim[:4] + per_dim[4:])
    kept, dims = kept_dims(s, 2, True, 8)
    assert dims.shape == (2, 4) and torch.equal(dims[:, 2:], dims[:, :2] + 4)
    assert set(kept[0].tolist()) == set(torch.topk(s[0], 2).indices.tolist())
    assert qk_scores(dq, dk, rope=False).shape == (2, 8)


def test_value_output_svd_is_optimal_in_the_whitened_norm():
    X, g = _data(d=24)
    C = X.T @ X / len(X)
    h, ih, _ = psd_sqrt(C)
    Wv = torch.randn(8, 24, generator=g, dtype=F64)
    Wo = torch.randn(2, 24, 8, generator=g, dtype=F64)  # two query heads share the kv head
    full = torch.cat([Wo[i] @ Wv for i in range(2)])  # (2·24, 24) stacked value-output products

    def err(r):
        v, o = vo_factors(h, ih, Wv, Wo, r)
        assert v.shape == (r, 24) and o.shape == (2, 24, r)
        return float(((full - torch.cat([o[i] @ v for i in range(2)])) @ X.T).pow(2).sum())

    assert err(8) < 1e-12 * float((full @ X.T).pow(2).sum())  # full rank: exact
    sv = torch.linalg.svdvals(full @ h)  # the best rank-r approximation of the products on the data
    for r in (2, 5):
        assert err(r) == pytest.approx(len(X) * float(sv[r:].square().sum()), rel=1e-8)


def test_block_influence_shares_and_cap():
    w = block_influence_sparsity([0.5, 0.1, 0.1, 0.3], 0.1)
    assert sum(w) == pytest.approx(1.0) and w[1] == w[2] > w[3] > w[0]
    phi = spread([4 * 0.6 * x for x in w], w, 0.9)
    assert max(phi) <= 0.9 + 1e-12 and sum(phi) == pytest.approx(4 * 0.6)


# ----------------------------------------------------------------------------- the reduced attention
def _reduced_copy(attn: nn.Module, spec_family: str, keep_pairs: list[list[int]] | None, layer_idx: int):
    """A ReducedAttention with the rows of the kept pairs of a stock llama-like attention (no re-fit)."""
    cfg = attn.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    G = H // Hkv
    pairs = keep_pairs or [list(range(hd // 2))] * Hkv
    dims = torch.tensor([p + [i + hd // 2 for i in p] for p in pairs])
    k_rows = (dims + torch.arange(Hkv)[:, None] * hd).reshape(-1)
    q_rows = (dims.repeat_interleave(G, 0) + torch.arange(H)[:, None] * hd).reshape(-1)
    spec = {"type": "attention", "hidden": cfg.hidden_size, "heads": H, "kv_heads": Hkv, "head_dim": hd,
            "qk_dim": dims.shape[1], "v_dim": hd, "scale": attn.scaling, "layer_idx": layer_idx, "rope": pairs,
            "names": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
            "bias": {r: getattr(attn, f"{r}_proj").bias is not None for r in "qkvo"}, "qk_norm_eps": None}
    new = ReducedAttention(spec)
    with torch.no_grad():
        for role, rows in (("q", q_rows), ("k", k_rows), ("v", slice(None)), ("o", slice(None))):
            src, dst = getattr(attn, f"{role}_proj"), getattr(new, f"{role}_proj")
            dst.weight.copy_(src.weight[rows])
            if src.bias is not None:
                dst.bias.copy_(src.bias[rows])
    return new, q_rows, k_rows


def _explicit_attention(attn: ReducedAttention, x, cos, sin, mask):
    """The reduced attention written out: per-head RoPE at the kept dimensions, kv heads repeated,
    softmax(q kᵀ·scale + mask) v. x: (b, L, d); cos, sin: (b, L, head_dim); mask: additive (b, 1, L, L)."""
    b, L, _ = x.shape
    H, Hkv, qk, vd, G = attn.heads, attn.kv_heads, attn.qk_dim, attn.v_dim, attn.num_key_value_groups
    q = attn.q_proj(x).view(b, L, H, qk).transpose(1, 2)
    k = attn.k_proj(x).view(b, L, Hkv, qk).transpose(1, 2)
    v = attn.v_proj(x).view(b, L, Hkv, vd).transpose(1, 2).repeat_interleave(G, 1)
    idx = [p + [i + attn.head_dim // 2 for i in p] for p in attn.rope]
    c = torch.stack([cos[..., i] for i in idx], 1)  # (b, Hkv, L, qk)
    s_ = torch.stack([sin[..., i] for i in idx], 1)
    rot = lambda t: torch.cat([-t[..., qk // 2:], t[..., :qk // 2]], -1)  # noqa: E731
    k = k * c + rot(k) * s_
    q = q * c.repeat_interleave(G, 1) + rot(q) * s_.repeat_interleave(G, 1)
    k = k.repeat_interleave(G, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) * attn.scaling + mask, -1)
    return attn.o_proj((w @ v).transpose(1, 2).reshape(b, L, H * vd))


@pytest.mark.parametrize("qk_dim,v_dim", [(6, 3), (4, 7), (6, 6), (2, 16)])
def test_reduced_attention_paths_equal_the_explicit_formula(qk_dim, v_dim):
    """Several tokens (zero-padded SDPA, causal or with a padding mask, boolean or additive) and one
    token at a time against a KV cache (batched matmuls) give the written-out attention."""
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    g = torch.Generator().manual_seed(0)
    hd, b, L = 16, 2, 9
    pairs = [sorted(torch.randperm(hd // 2, generator=g)[:qk_dim // 2].tolist()) for _ in range(2)]
    spec = {"type": "attention", "hidden": 32, "heads": 6, "kv_heads": 2, "head_dim": hd, "qk_dim": qk_dim,
            "v_dim": v_dim, "scale": hd ** -0.5, "layer_idx": 0, "rope": pairs,
            "names": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
            "bias": {"q": True, "k": True, "v": False, "o": False}, "qk_norm_eps": None}
    attn = ReducedAttention(spec).eval()
    with torch.no_grad():
        for prm in attn.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    x = torch.randn(b, L, 32, generator=g)
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=hd))(
        x, torch.arange(L)[None].expand(b, -1))
    causal = torch.full((L, L), float("-inf")).triu(1)
    keep = torch.ones(b, L, dtype=torch.bool)
    keep[1, :3] = False  # left padding of the second row
    padded = causal + torch.where(keep, 0.0, float("-inf"))[:, None, None, :]  # (b, 1, L, L)
    with torch.no_grad():
        want = _explicit_attention(attn, x, cos, sin, causal[None, None])
        assert torch.allclose(attn(x, (cos, sin), None)[0], want, atol=1e-5)
        want_pad = _explicit_attention(attn, x, cos, sin, padded)
        for mask in (padded, padded == 0):  # additive and boolean; rows of padded queries are not compared
            got = attn(x, (cos, sin), mask)[0]
            assert torch.allclose(got[keep], want_pad[keep], atol=1e-5)
        cache = DynamicCache()
        attn(x[:, :4], (cos[:, :4], sin[:, :4]), None, past_key_values=cache)
        for t in range(4, L):  # one token at a time against the cache, with and without a mask
            mask = None if t % 2 else (padded[:, :, t:t + 1, :t + 1] == 0)
            got = attn(x[:, t:t + 1], (cos[:, t:t + 1], sin[:, t:t + 1]), mask, past_key_values=cache)[0]
            ref = want[:, t] if mask is None else want_pad[:, t]
            assert torch.allclose(got[:, 0], ref, atol=1e-5), t
        assert cache.layers[0].keys.shape[-1] == qk_dim and cache.layers[0].values.shape[-1] == v_dim


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kept_rope_pairs_equal_zeroed_pairs_in_the_stock_attention(family):
    """Dropping query/key pairs with gathered cos/sin == the stock model with those rows zeroed, with
    and without a KV cache, with padding."""
    dense = tiny_model(family)
    reduced, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    g = torch.Generator().manual_seed(3)
    for i, layer in enumerate(dense.model.layers):
        pairs = [sorted(torch.randperm(8, generator=g)[:3].tolist()) for _ in range(2)]
        new, q_rows, k_rows = _reduced_copy(layer.self_attn, family, pairs, i)
        reduced.model.layers[i].self_attn = new
        z = zeroed.model.layers[i].self_attn
        with torch.no_grad():
            for proj, rows in ((z.q_proj, q_rows), (z.k_proj, k_rows)):
                keep = torch.zeros(proj.out_features, dtype=torch.bool)
                keep[rows] = True
                proj.weight[~keep] = 0.0
                if proj.bias is not None:
                    proj.bias[~keep] = 0.0
    assert torch.allclose(outputs(reduced, IDS), outputs(zeroed, IDS), atol=1e-5)
    am = torch.ones_like(IDS[:2])
    am[1, :5] = 0  # left padding
    with torch.no_grad():
        a = reduced(input_ids=IDS[:2], attention_mask=am).logits
        b = zeroed(input_ids=IDS[:2], attention_mask=am).logits
    assert torch.allclose(a[am.bool()], b[am.bool()], atol=1e-5)
    gen = [m.generate(IDS[:2], attention_mask=am, max_new_tokens=6, do_sample=False) for m in (reduced, zeroed)]
    assert torch.equal(gen[0], gen[1])


def test_full_size_reduced_attention_equals_stock_in_eager_and_sdpa():
    for impl in ("sdpa", "eager"):
        dense = tiny_model("mistral")
        dense.set_attn_implementation(impl)
        red = copy.deepcopy(dense)
        for i, layer in enumerate(red.model.layers):
            layer.self_attn = _reduced_copy(layer.self_attn, "mistral", None, i)[0]
        assert torch.allclose(outputs(red, IDS), outputs(dense, IDS), atol=1e-5), impl


# ----------------------------------------------------------------------------- compress every family
@pytest.fixture(scope="module")
def compressed():
    out = {}
    for family in SUPPORTED:
        model = tiny_model(family)
        before = outputs(model, IDS)
        report = compress(model, None, make_config("modegpt", ratio=0.3), IDS, progress=False, run=RunSettings(batch_size=4))
        out[family] = (model, report, before)
    return out


@pytest.mark.parametrize("family", SUPPORTED)
def test_every_supported_family_shrinks_dimensions_and_meets_the_ratio(compressed, family):
    model, report, before = compressed[family]
    assert abs(report.ratio_achieved - 0.3) <= 0.01 and report.params_after == count_params(model)
    after = outputs(model, IDS)
    assert torch.isfinite(after).all()
    rel, zeroed = rel_error(after, before), zeroed_error(family, IDS, before)
    assert rel < 0.3 * zeroed, f"relative output error {rel:.4f}, {rel / zeroed:.2f} of zeroed layers'"
    attn = [m for m in model.modules() if isinstance(m, ReducedAttention)]
    # gemma's random norms make the layers' influences far apart: the allocation may keep one attention dense
    assert len(attn) == 2 or (family in ("gemma2", "gemma3") and len(attn) == 1)
    assert all(a.v_dim < a.head_dim for a in attn)
    assert all(a.softcap == (50.0 if family == "gemma2" else None) for a in attn)  # Gemma 2's capped logits
    if family in QK_WHOLE:
        assert all(a.qk_dim == a.head_dim and (a.q_norm is not None) == (family in QK_NORM) for a in attn)
    else:
        assert all(a.qk_dim < a.head_dim for a in attn)
    assert any(isinstance(m, ReducedLinear) for m in model.modules())
    assert not any(type(m).__name__ == "LowRankLinear" for m in model.modules())  # no extra matrices
    assert all(rec["type"] in ("attention", "linear") for rec in report.modules.values())
    gen = model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=4, do_sample=False)
    with torch.no_grad():  # the cached decode agrees with a full forward of the generated sequence
        full = model(input_ids=gen[:, :-1]).logits[0, -1].argmax()
    assert gen[0, -1] == full


def test_smollm3_nope_layers_select_single_dimensions_and_rotate_nothing(compressed):
    """SmolLM3's layer 1 has no RoPE: its query/key dimensions are chosen one by one (as OPT's) and the
    reduced attention rotates nothing there; layer 0 keeps whole rotary pairs."""
    model = compressed["smollm3"][0]
    rope_layer, nope_layer = (layer.self_attn for layer in model.model.layers)
    assert model.config.no_rope_layers == [1, 0] and nope_layer.rope is None and rope_layer.rope is not None
    assert nope_layer.qk_dim < nope_layer.head_dim and rope_layer.qk_dim % 2 == 0


def test_bert_encoder_attention_is_rebuilt_bidirectional_with_its_output_projection_outside():
    """BERT: the self-attention (q/k/v, no RoPE, bidirectional) becomes a ReducedAttention returning its
    heads; the output projection, in BertSelfOutput with the residual norm, a ReducedLinear reading the
    smaller value heads. A right-padded row's real tokens get what the sequence alone gets."""
    model = tiny_model("bert")
    before = outputs(model, IDS)
    report = compress(model, None, make_config("modegpt", ratio=0.3), IDS, progress=False, run=RunSettings(batch_size=4))
    assert abs(report.ratio_achieved - 0.3) <= 0.01
    rel = rel_error(outputs(model, IDS), before)
    assert rel < 0.3 * zeroed_error("bert", IDS, before)
    for layer in model.encoder.layer:
        attn, out = layer.attention.self, layer.attention.output.dense
        assert isinstance(attn, ReducedAttention) and not attn.is_causal and attn.rope is None
        assert attn.qk_dim < attn.head_dim and isinstance(out, ReducedLinear) and out.in_features == 4 * attn.v_dim
    am = torch.ones_like(IDS[:2])
    am[1, 20:] = 0
    with torch.no_grad():
        padded = model(input_ids=IDS[:2], attention_mask=am).last_hidden_state
        alone = model(input_ids=IDS[1:2, :20]).last_hidden_state
    assert torch.allclose(padded[1, :20], alone[0], atol=1e-5)


def test_experts_each_keep_their_own_channels_and_an_unrouted_one_keeps_its_largest(monkeypatch):
    """Mixture of experts: every expert's MLP is a Nyström of its own down projection on the tokens routed
    to it (the router untouched); an expert no calibration token reached keeps the channels of largest
    weight norms and its down projection's columns as they were (a guard says so)."""
    model = tiny_model("mixtral")
    for layer in model.model.layers:  # the router never picks expert 3 during compression
        def never_3(mod, args, out):
            logits, weights, index = out
            return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)
        layer.mlp.gate.register_forward_hook(never_3)
    dense = copy.deepcopy(model)
    rankdown.arch.spec_for(dense).prepare(dense)  # experts unfused, as compress does
    report = compress(model, None, make_config("modegpt", ratio=0.3), IDS, progress=False, run=RunSettings(batch_size=4))
    for i, layer in enumerate(model.model.layers):
        assert report.guards[f"model.layers.{i}.mlp.experts.experts.3.down_proj"]["kind"] == "expert_without_tokens"
        old = dense.model.layers[i]
        assert torch.equal(layer.mlp.gate.weight, old.mlp.gate.weight)  # the router untouched
        widths = {e.down_proj.in_features for e in layer.mlp.experts.experts}
        assert len(widths) == 1 and widths.pop() < 128
        picked = []
        for e, (new, was) in enumerate(zip(layer.mlp.experts.experts, old.mlp.experts.experts)):
            rows = [int((was.gate_proj.weight == r).all(1).nonzero()) for r in new.gate_proj.weight]
            assert torch.equal(new.up_proj.weight, was.up_proj.weight[rows])
            picked.append(rows)
            if e == 3:
                assert torch.equal(new.down_proj.weight, was.down_proj.weight[:, rows])
        assert len({tuple(r) for r in picked}) == 4  # each expert chose from its own correlation


@pytest.mark.parametrize("family", ["llama4"])
def test_unsupported_families_say_why_and_what_works(family):
    with pytest.raises(UnsupportedModelError, match=r"modegpt does not support .*rom or svd-llm"):
        compress(tiny_model(family), None, make_config("modegpt", ratio=0.2), IDS, progress=False)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.5])
@pytest.mark.parametrize("allocation", ["block-influence", "uniform"])
def test_ratio_is_met(ratio, allocation):
    model = tiny_model("llama")
    report = compress(model, None, make_config("modegpt", ratio=ratio, allocation=allocation), IDS,
                      progress=False, run=RunSettings(batch_size=8))
    assert abs(report.ratio_achieved - ratio) <= 0.01
    alloc = report.artifacts["modegpt_allocation.json"]
    phis = list(alloc["sparsity"].values())
    assert max(phis) <= 0.9 + 1e-9
    if allocation == "uniform":
        assert max(phis) - min(phis) < 1e-9


@pytest.mark.parametrize("share", [QK_SHARE, 1.0])
def test_query_key_lose_their_share_of_the_layer_sparsity(share):
    """q/k lose ``qk_share·φ`` of their head size (0.25·φ by default), v/o and the MLP ``φ``; 1 is the
    paper's rule. The ratio is still met: the others pay for what q/k keep."""
    model = tiny_model("llama")
    config = make_config("modegpt", ratio=0.3, allocation="uniform", qk_share=share)
    report = compress(model, None, config, IDS, run=RunSettings(batch_size=8), progress=False)
    alloc = report.artifacts["modegpt_allocation.json"]
    phi = alloc["sparsity"]["0"]
    assert alloc["qk_share"] == share and abs(report.ratio_achieved - 0.3) <= 0.01
    attn = [m for m in model.modules() if isinstance(m, ReducedAttention)]
    hd = attn[0].head_dim
    assert all(a.qk_dim == 2 * round((1 - share * phi) * hd / 2) and a.v_dim == round((1 - phi) * hd) for a in attn)
    if share < 1:
        assert all(a.qk_dim > a.v_dim for a in attn)
    with pytest.raises(ConfigError, match="qk_share must be in"):
        make_config("modegpt", ratio=0.3, qk_share=1.5).validate()


def test_unreachable_ratio_names_the_range():
    with pytest.raises(ConfigError, match=r"cannot be reached by modegpt.*--ratio in \(0, 0\.\d+\]"):
        compress(tiny_model("llama"), None, make_config("modegpt", ratio=0.95), IDS, progress=False)
    for bad in (dict(allocation="global"), dict(cap=1.0), dict(epsilon=0.0), dict(ridge=0.0)):
        with pytest.raises(ConfigError):
            make_config("modegpt", **bad).validate()


def test_nearly_singular_statistics_stay_finite():
    """A dead MLP channel, duplicated kv heads and queries, a dead hidden dimension at the attention input."""
    model = tiny_model("qwen2")
    hd = 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[[3, 40]] = 0.0  # silu(0) * up = 0: dead channels
            layer.mlp.up_proj.weight[[3, 40]] = 0.0
            a = layer.self_attn
            for proj in (a.k_proj, a.v_proj):  # kv head 1 := kv head 0
                proj.weight[hd:] = proj.weight[:hd]
                proj.bias[hd:] = proj.bias[:hd]
            a.q_proj.weight[hd:2 * hd] = a.q_proj.weight[:hd]
            layer.input_layernorm.weight[[0, 7]] = 0.0  # rank-deficient attention input
    before = outputs(model, IDS)
    report = compress(model, None, make_config("modegpt", ratio=0.3), IDS, progress=False, run=RunSettings(batch_size=4))
    after = outputs(model, IDS)
    assert torch.isfinite(after).all() and all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(report.ratio_achieved - 0.3) <= 0.01
    rel = rel_error(after, before)  # the model is not tiny_model("qwen2"): its own zeroed layers are the scale
    assert rel < 0.3 * zeroed_error(model, IDS, before), f"relative output error {rel:.4f}"
    kinds = {g["kind"] for g in report.guards.values()}
    assert {"eigenvalue_floor", "nystrom_ridge"} <= kinds


def _flops(model: nn.Module, context: int) -> int:
    """Multiply-adds per token in the decoder layers: every linear, plus q·k and attention·v over ``context``."""
    flops = 0
    for m in model.model.layers.modules():
        if isinstance(m, nn.Linear):
            flops += m.in_features * m.out_features
        if isinstance(m, ReducedAttention):
            flops += context * m.heads * (m.qk_dim + m.v_dim)
        elif hasattr(m, "q_proj") and hasattr(m, "head_dim"):
            flops += context * m.config.num_attention_heads * 2 * m.head_dim
    return flops


def test_fewer_flops_than_dense_in_proportion_to_parameters(compressed):
    """The linears' multiply-adds shrink with the parameters; with the attention over 512 tokens too,
    by less (query/key lose only qk_share of a layer's sparsity, so q·k shrinks less)."""
    dense = tiny_model("llama")
    model, report, _ = compressed["llama"]
    layer_params = lambda m: sum(p.numel() for p in m.model.layers.parameters())  # noqa: E731
    param_ratio = layer_params(model) / layer_params(dense)
    assert _flops(model, 0) / _flops(dense, 0) <= param_ratio + 0.02
    assert _flops(model, 512) / _flops(dense, 512) < 0.8


# ----------------------------------------------------------------------------- save and load
REMOTE = r"""
import sys
sys.modules["rankdown"] = None
import json, os, torch
torch.set_num_threads(int(os.environ["RANKDOWN_TEST_THREADS"]))
from transformers import AutoModelForCausalLM
dirs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
out = {}
for name, d in dirs.items():
    model, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    gen = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False)
    out[name] = {"info": {k: list(map(str, v)) for k, v in info.items()}, "logits": logits, "gen": gen}
torch.save(out, sys.argv[3])
"""


def test_save_load_round_trip_is_exact(compressed, tmp_path):
    dirs = {}
    for family in ("llama-tied", "qwen2", "qwen3", "opt"):
        model, report, _ = compressed[family]
        folder = rankdown.save(model, None, tmp_path / family, report)
        dirs[family] = str(folder)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["rankdown"]["structure"]["modules"] == report.modules
        assert json.loads((folder / "modegpt_allocation.json").read_text())["sparsity"]
        loaded = rankdown.load(folder)
        assert count_params(loaded) == count_params(model)
        assert torch.equal(outputs(loaded, IDS), outputs(model, IDS))
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               RANKDOWN_TEST_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(dirs), str(tmp_path / "ids.pt"),
                           str(tmp_path / "r.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "r.pt")
    for family in dirs:
        model = compressed[family][0]
        r = remote[family]
        assert all(not v for v in r["info"].values()), r["info"]
        assert torch.equal(r["logits"], outputs(model, IDS)), family
        gen = model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=4, do_sample=False)
        assert torch.equal(r["gen"], gen)


# ----------------------------------------------------------------------------- the reference model
SEQLEN, WINDOWS = 256, 40


@pytest.fixture(scope="module")
def ref_ppl(reference):
    """ppl(method, **settings) at ratio 0.3 on the reference model (32 calibration windows); "dense" for none."""
    from rankdown.calib import calibration_data
    from rankdown.eval.perplexity import perplexity

    model, tok = reference
    torch.set_num_threads(2)
    calib = calibration_data(tok, "reference", nsamples=32, seqlen=SEQLEN, seed=0)
    cache: dict = {}

    def run(method: str, **settings) -> float:
        key = (method, repr(sorted(settings.items())))
        if key not in cache:
            m = copy.deepcopy(model)
            if method != "dense":
                rep = rankdown.compress(m, tok, make_config(method, ratio=0.3, **settings), calib, progress=False)
                assert abs(rep.ratio_achieved - 0.3) <= 0.01
            cache[key] = perplexity(m, tok, "reference-heldout", seqlen=SEQLEN, max_windows=WINDOWS).ppl
        return cache[key]

    return run


@pytest.mark.slow
def test_reference_block_influence_beats_uniform_at_30_percent(ref_ppl):
    dense = ref_ppl("dense")
    bi, uni = ref_ppl("modegpt"), ref_ppl("modegpt", allocation="uniform")
    assert dense < bi < uni


@pytest.mark.slow
def test_reference_modegpt_beats_svd_at_30_percent(ref_ppl):
    """Measured here (40 windows): dense 34.16, svd 35.70, modegpt 35.47; with the paper's rule (q/k
    losing the whole layer sparsity, qk_share 1) 36.69: on this small model (head size 32, 16 rotary
    pairs a head) selecting query/key dimensions costs more than it saves."""
    assert ref_ppl("dense") < ref_ppl("modegpt") < ref_ppl("svd")
