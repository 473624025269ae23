"""What a family needs beyond its table row, checked where the contract matrix cannot see it:
Gemma 3's (1 + w) query/key norms, sliding and full layers inside the reduced attention; and every
newer family's compressed folder loading back with identical logits, with rankdown and without it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import rankdown
from rankdown.allocate import count_params
from rankdown.api import compress
from rankdown.config import RunSettings
from rankdown.methods import make_config
from rankdown.nn.portable import ReducedAttention
from tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)


def _full_size_copy(attn: torch.nn.Module, layer_idx: int, offset: float) -> ReducedAttention:
    """A ReducedAttention holding every query/key/value dimension of a stock attention with q/k norms."""
    cfg = attn.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    spec = {"type": "attention", "hidden": cfg.hidden_size, "heads": H, "kv_heads": Hkv, "head_dim": hd,
            "qk_dim": hd, "v_dim": hd, "scale": attn.scaling, "layer_idx": layer_idx,
            "rope": [list(range(hd // 2))] * Hkv, "names": {r: f"{r}_proj" for r in "qkvo"},
            "bias": {r: False for r in "qkvo"}, "qk_norm_eps": attn.q_norm.eps, "qk_norm_offset": offset}
    new = ReducedAttention(spec)
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.copy_(attn.get_parameter(name))
    return new


def test_gemma3_reduced_attention_equals_the_stock_one_on_sliding_and_full_layers():
    """Gemma 3's layers (a sliding one with RoPE base 10k, a full one with 1M; q/k norms (1 + w) with
    random w) rebuilt as full-size reduced attentions give the stock model's logits and greedy tokens,
    with padding and a KV cache; the same norms computing w·x would not."""
    dense = tiny_model("gemma3")
    assert dense.config.layer_types == ["sliding_attention", "full_attention"] and IDS.shape[1] > dense.config.sliding_window
    got = {}
    for offset in (1.0, 0.0):
        red = copy.deepcopy(dense)
        for i, layer in enumerate(red.model.layers):
            layer.self_attn = _full_size_copy(layer.self_attn, i, offset)
        got[offset] = red
    want = outputs(dense, IDS)
    assert torch.allclose(outputs(got[1.0], IDS), want, atol=1e-5)
    assert not torch.allclose(outputs(got[0.0], IDS), want, atol=1e-2)
    am = torch.ones_like(IDS[:2])
    am[1, :5] = 0  # left padding
    gen = [m.generate(IDS[:2], attention_mask=am, max_new_tokens=12, do_sample=False) for m in (got[1.0], dense)]
    assert torch.equal(gen[0], gen[1])


def _whole_spec(cfg, attn, i: int, **extra) -> dict:
    """A ReducedAttention record that keeps every query/key and value dimension of layer ``i``."""
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    return {"type": "attention", "hidden": cfg.hidden_size, "heads": H, "kv_heads": Hkv, "head_dim": hd,
            "qk_dim": hd, "v_dim": hd, "scale": attn.scaling, "layer_idx": i, "rope": [list(range(hd // 2))] * Hkv,
            "names": {r: f"{r}_proj" for r in "qkvo"}, "bias": {r: False for r in "qkvo"}, **extra}


def test_olmo2_whole_projection_query_key_norms_in_the_reduced_attention():
    """OLMo 2 RMS-normalises each whole q and k projection (every head at once, the scale in float32):
    full-size reduced attentions with that norm (random weights) give the stock logits and greedy
    tokens with padding and a KV cache; the per-head norm of Qwen3 would not."""
    dense = tiny_model("olmo2")
    cfg = dense.config
    hd = dense.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for layer in dense.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.3)
    got = {}
    for whole in (True, False):
        red = copy.deepcopy(dense)
        for i, layer in enumerate(red.model.layers):
            attn = layer.self_attn
            spec = _whole_spec(cfg, attn, i, qk_norm_eps=attn.q_norm.variance_epsilon, qk_norm_all=whole)
            new = ReducedAttention(spec)
            with torch.no_grad():
                for name, p in new.named_parameters():
                    src = attn.get_parameter(name)
                    p.copy_(src if whole or "norm" not in name else src.view(-1, hd)[0])
            layer.self_attn = new
        got[whole] = red
    want = outputs(dense, IDS)
    assert torch.allclose(outputs(got[True], IDS), want, atol=1e-5)
    assert not torch.allclose(outputs(got[False], IDS), want, atol=1e-2)
    am = torch.ones_like(IDS[:2])
    am[1, :5] = 0
    gen = [m.generate(IDS[:2], attention_mask=am, max_new_tokens=8, do_sample=False) for m in (got[True], dense)]
    assert torch.equal(gen[0], gen[1])


def test_gemma2_soft_capped_logits_in_the_reduced_attention():
    """Gemma 2 caps its attention logits (cap·tanh(s/cap), before the mask; SDPA cannot): full-size
    reduced attentions carrying the cap take the eager path and give the stock logits and greedy tokens,
    on its sliding and full layers, with padding and a KV cache; without the cap they would not."""
    import transformers as tf

    from tiny import CONFIGS

    torch.manual_seed(0)
    cfg = CONFIGS["gemma2"]()
    cfg.attn_logit_softcapping = 1.0  # a cap the tiny model's logits reach (Gemma 2's own is 50) ...
    dense = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # ... once its queries are scaled up
        for layer in dense.model.layers:
            layer.self_attn.q_proj.weight.mul_(100.0)
    assert "sliding_attention" in cfg.layer_types and IDS.shape[1] > cfg.sliding_window
    got = {}
    for cap in (cfg.attn_logit_softcapping, None):
        red = copy.deepcopy(dense)
        for i, layer in enumerate(red.model.layers):
            attn = layer.self_attn
            spec = _whole_spec(cfg, attn, i, **({"softcap": cap} if cap else {}))
            new = ReducedAttention(spec)
            with torch.no_grad():
                for name, p in new.named_parameters():
                    p.copy_(attn.get_parameter(name))
            layer.self_attn = new
        got[cap] = red
    want = outputs(dense, IDS)
    assert torch.allclose(outputs(got[cfg.attn_logit_softcapping], IDS), want, atol=1e-5)
    assert not torch.allclose(outputs(got[None], IDS), want, atol=1e-2)
    am = torch.ones_like(IDS[:2])
    am[1, :5] = 0  # left padding
    gen = [m.generate(IDS[:2], attention_mask=am, max_new_tokens=12, do_sample=False)
           for m in (got[cfg.attn_logit_softcapping], dense)]
    assert torch.equal(gen[0], gen[1])


def test_phi_fused_qkv_and_partial_rope_in_the_reduced_attention():
    """Phi-3/Phi-4: q/k/v are row blocks of one qkv_proj, sliced into three linears; Phi-4-mini rotates
    only the leading 3/4 of each head. A full-size ReducedAttention from those slices (every rotary pair
    of the rotated part, the rest passed through) gives the stock logits and greedy tokens with a KV cache."""
    dense = tiny_model("phi4")
    cfg = dense.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, dense.model.layers[0].self_attn.head_dim
    rot = int(hd * cfg.rope_parameters["partial_rotary_factor"])
    assert rot < hd
    red = copy.deepcopy(dense)
    for i, layer in enumerate(red.model.layers):
        attn = layer.self_attn
        spec = {"type": "attention", "hidden": cfg.hidden_size, "heads": H, "kv_heads": Hkv, "head_dim": hd,
                "qk_dim": hd, "v_dim": hd, "scale": attn.scaling, "layer_idx": i, "rope": [list(range(rot // 2))] * Hkv,
                "rotary_dim": rot, "names": {r: f"{r}_proj" for r in "qkvo"}, "bias": {r: False for r in "qkvo"}}
        new = ReducedAttention(spec)
        q, k, v = attn.qkv_proj.weight.split([H * hd, Hkv * hd, Hkv * hd])
        with torch.no_grad():
            for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", attn.o_proj.weight)):
                new.get_submodule(name).weight.copy_(w)
        layer.self_attn = new
    assert torch.allclose(outputs(red, IDS), outputs(dense, IDS), atol=1e-5)
    gen = [m.generate(IDS[:2], attention_mask=torch.ones_like(IDS[:2]), max_new_tokens=8, do_sample=False)
           for m in (red, dense)]
    assert torch.equal(gen[0], gen[1])


# ----------------------------------------------------------------------------- save and load, both ways
# (family, method): a folder of every family, with modegpt where it runs
# and extra settings; gpt2's excluded c_proj stays a (converted) dense nn.Linear, which loading must rebuild
ROUND_TRIPS = [("gemma3", "svd-llm", {}), ("gemma3", "modegpt", {}), ("gpt2", "svd-llm", {"exclude": [r"mlp\.c_proj"]}),
               ("gpt_neox", "svd-llm", {}), ("qwen2_moe", "svd-llm", {}), ("qwen3_moe", "rom", {}),
               ("llama4", "svd-llm", {}), ("olmo2", "svd-llm", {}), ("smollm3", "svd-llm", {}), ("phi4", "svd-llm", {}),
               ("falcon", "svd-llm", {}), ("stablelm", "lillama", {"epochs": 1}),  # these two: the generic path
               ("mixtral", "modegpt", {}), ("qwen2_moe", "modegpt", {}), ("qwen3_moe", "modegpt", {}),
               ("smollm3", "modegpt", {}), ("bert", "modegpt", {}),  # an encoder: AutoModel, hidden states
               ("phi3", "modegpt", {}), ("phi4", "modegpt", {}),
               ("gemma2", "modegpt", {}), ("olmo2", "modegpt", {}),
               ("gpt2", "modegpt", {}), ("gpt_neox", "modegpt", {}),
               # the first table's families
               ("llama", "modegpt", {}), ("llama-tied", "rom", {}), ("mistral", "svd-llm", {}), ("qwen2", "modegpt", {}),
               ("qwen3", "modegpt", {}), ("opt", "modegpt", {}), ("gemma2", "asvd", {}), ("phi3", "fwsvd", {})]

REMOTE = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoModel, AutoModelForCausalLM
dirs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
out = {}
for name, d in dirs.items():
    encoder = name.startswith("bert-")
    auto = AutoModel if encoder else AutoModelForCausalLM
    model, info = auto.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    assert "rankdown" not in sys.modules
    with torch.no_grad():
        o = model.eval()(input_ids=ids)
    logits = o.last_hidden_state if encoder else o.logits
    gen = None if encoder else model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                                              do_sample=False)
    out[name] = {"info": {k: list(map(str, v)) for k, v in info.items()}, "logits": logits, "gen": gen}
torch.save(out, sys.argv[3])
"""


def test_compressed_folders_load_back_identically_with_and_without_rankdown(tmp_path):
    models, dirs = {}, {}
    for family, method, extra in ROUND_TRIPS:
        name = f"{family}-{method}"
        model = tiny_model(family)
        report = compress(model, None, make_config(method, ratio=0.25, **extra), IDS, progress=False,
                          run=RunSettings(batch_size=4))
        folder = rankdown.save(model, None, tmp_path / name, report)
        loaded = rankdown.load(folder)
        assert count_params(loaded) == count_params(model)
        assert torch.equal(outputs(loaded, IDS), outputs(model, IDS)), name
        models[name], dirs[name] = model, str(folder)
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(dirs), str(tmp_path / "ids.pt"),
                           str(tmp_path / "r.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "r.pt")
    for name, model in models.items():
        r = remote[name]
        assert all(not v for v in r["info"].values()), (name, r["info"])
        assert torch.equal(r["logits"], outputs(model, IDS)), name
        if name.startswith("bert-"):
            continue
        gen = model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=6, do_sample=False)
        assert torch.equal(r["gen"], gen), name


def test_gpt2_conv1d_becomes_linear_with_the_same_outputs_and_streaming_is_refused():
    """GPT-2 keeps its linears as Conv1D, weights (in, out): prepared, each is an nn.Linear with the
    transposed weight (same logits), so every method reads (out, in) weights; a streamed skeleton
    (meta weights, files holding (in, out)) is refused rather than loaded transposed."""
    from rankdown.arch import UnsupportedModelError, spec_for
    from rankdown.nn.portable import is_conv1d

    model = tiny_model("gpt2")
    before = outputs(model, IDS)
    spec = spec_for(model)
    done = spec.prepare(model)
    assert len(done) == 8 and not any(is_conv1d(m) for m in model.modules())
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, torch.nn.Linear) and c_fc.weight.shape == (128, 64)
    assert torch.allclose(outputs(model, IDS), before, atol=1e-5)
    with torch.device("meta"):
        skeleton = tiny_model("gpt2")
    with pytest.raises(UnsupportedModelError, match="--no-stream"):
        spec.prepare(skeleton)
    assert not spec.streamable


def test_a_dominant_embedding_is_reported_with_what_the_layers_must_carry(caplog):
    """Gemma 3's 262k vocabulary holds much of a small model: compress says what share the layers
    hold and how much of theirs the ratio removes (here a 2048-token vocabulary on the tiny layers)."""
    import logging

    import transformers as tf

    from tiny import CONFIGS

    torch.manual_seed(0)
    config = CONFIGS["gemma3"]()
    config.vocab_size = 2048
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    held = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    share = held / count_params(model)
    with caplog.at_level(logging.WARNING, logger="rankdown"):
        report = compress(model, None, make_config("svd", ratio=0.1), None, progress=False)
    note = [r.getMessage() for r in caplog.records if "compressed linears hold" in r.getMessage()]
    assert 0.2 < share < 0.5 and abs(report.ratio_achieved - 0.1) <= 0.01
    assert len(note) == 1 and f"hold {100 * share:.0f}%" in note[0], note
    assert f"removing 10% of the model removes {10 / share:.0f}% of theirs" in note[0]
    small = tiny_model("gemma3")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rankdown"):
        compress(small, None, make_config("svd", ratio=0.1), None, progress=False)
    assert not any("compressed linears hold" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "llama4"])
def test_unfused_experts_compute_what_the_fused_ones_do(family):
    """Prepared, the fused experts (Qwen's (E, 2I, H) tensors, Llama 4's (E, H, 2I) with every token
    through every expert) are one nn.Linear per expert projection, and the logits stay the same."""
    from rankdown.arch import spec_for
    from rankdown.nn.portable import UnfusedExperts

    model = tiny_model(family)
    before = outputs(model, IDS)
    done = spec_for(model).prepare(model)
    assert done and all(isinstance(model.get_submodule(p), UnfusedExperts) for p in done)
    assert torch.allclose(outputs(model, IDS), before, atol=1e-5)


def test_a_family_without_a_row_runs_on_the_generic_path_and_says_so(caplog):
    """Falcon and StableLM have no row: the layers are the repeated block list, the linears those that
    compute x Wᵀ + b, grouped by the input they share in one forward (Falcon's parallel attention and
    MLP read one norm's output); a warning says so, and modegpt refuses naming what it supports."""
    import logging

    from rankdown.arch import UnsupportedModelError, spec_for

    with caplog.at_level(logging.WARNING, logger="rankdown"):
        falcon, stablelm = spec_for(tiny_model("falcon")), spec_for(tiny_model("stablelm"))
    assert falcon.layers == ("transformer.h",) and falcon.observed == (
        ("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",), ("mlp.dense_4h_to_h",))
    assert stablelm.layers == ("model.layers",) and stablelm.observed == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    notes = [r.getMessage() for r in caplog.records if "generic path" in r.getMessage()]
    assert len(notes) == 2 and "'falcon' has no row" in notes[0] and "2 layers at transformer.h" in notes[0]
    with pytest.raises(UnsupportedModelError, match=r"modegpt does not support stablelm: .*generic path.*llama, mistral"):
        compress(tiny_model("stablelm"), None, make_config("modegpt", ratio=0.2), IDS, progress=False)
