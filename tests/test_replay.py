"""The engine's replay (``LayerContext.collect(replay=True)``): once the inputs of a module's last
linear are recorded (o for the attention, down for the MLP), later passes over the layer compute
that module as its last linear applied to the recorded inputs instead of running it again. The
model must be the one that the full re-runs give."""

import pytest
import torch
import transformers as tf

from rankdown.config import RunSettings
from rankdown.api import compress
from rankdown.engine import LayerContext
from rankdown.methods import make_config
from tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)  # 2 batches of 4 rows

CLASSES = {"llama": (tf.models.llama.modeling_llama.LlamaAttention, tf.models.llama.modeling_llama.LlamaMLP),
           "opt": (tf.models.opt.modeling_opt.OPTAttention, None)}


def _compress(family, method, replay, monkeypatch, attn=None):
    """The compressed model and how often the attention and the MLP really ran (their class's
    forward: a replayed module's instance forward is a stub)."""
    model = tiny_model(family)
    if attn is not None:
        model.config._attn_implementation = attn
    calls = {"attn": 0, "mlp": 0, "dense_gate": 0}
    if family == "llama":  # a hook goes with the module it is on: counts the dense gate's calls
        for layer in model.model.layers:
            layer.mlp.gate_proj.register_forward_hook(lambda *a: calls.__setitem__("dense_gate", calls["dense_gate"] + 1))
    with monkeypatch.context() as m:
        if not replay:
            m.setattr(LayerContext, "_replay_units", lambda self, names: {})
        for key, cls in zip(("attn", "mlp"), CLASSES[family]):
            if cls is None:
                continue

            def counted(self, *a, _f=cls.forward, _k=key, **kw):
                calls[_k] += 1
                return _f(self, *a, **kw)

            m.setattr(cls, "forward", counted)
        extra = {"allocation": "uniform"} if method == "rom" else {}
        compress(model, None, make_config(method, ratio=0.25, **extra), IDS, progress=False, run=RunSettings(batch_size=4))
    return model, calls


def _same(a, b):
    ref, got = outputs(a, IDS), outputs(b, IDS)
    return torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["rom", "svd-llm", "asvd"])
def test_replay_runs_attention_and_mlp_twice_per_layer_not_five_and_three_times(method, monkeypatch):
    full, full_calls = _compress("llama", method, False, monkeypatch)
    fast, fast_calls = _compress("llama", method, True, monkeypatch)
    # per batch, passes [q,k,v], [o], [gate,up], [down] and the outputs (not of the last layer): the
    # attention runs in all of them without the replay (5 + 4), in the first 2 with it; the MLP in
    # the last 3 (3 + 2), or only in [gate,up] and [down]
    # the dense gate never runs: [gate,up] stops at gate's input, which is up's too
    assert full_calls == {"attn": 2 * (5 + 4), "mlp": 2 * (3 + 2), "dense_gate": 0}
    assert fast_calls == {"attn": 2 * (2 + 2), "mlp": 2 * (2 + 2), "dense_gate": 0}
    assert _same(full, fast)


def test_no_replay_where_the_module_returns_more_than_its_output(monkeypatch):
    """Eager attention also returns its weights: it is run every time (checked on the first batch),
    the MLP is still replayed, and the model is the same."""
    full, _ = _compress("llama", "svd-llm", False, monkeypatch, attn="eager")
    fast, calls = _compress("llama", "svd-llm", True, monkeypatch, attn="eager")
    assert calls == {"attn": 2 * (5 + 4), "mlp": 2 * (2 + 2), "dense_gate": 0}
    assert _same(full, fast)


def test_no_mlp_replay_where_the_mlp_is_not_a_module(monkeypatch):
    """OPT's fc1/fc2 sit in the layer itself: only its attention is replayed."""
    full, _ = _compress("opt", "rom", False, monkeypatch)
    fast, calls = _compress("opt", "rom", True, monkeypatch)
    assert calls["attn"] == 2 * (2 + 2)
    assert _same(full, fast)


def test_replay_is_checked_against_the_real_module(monkeypatch):
    """A parent whose output is not its last linear's (here the MLP output is scaled after down)
    is never replayed, and the model is the same as without the replay."""
    cls = tf.models.llama.modeling_llama.LlamaMLP
    scaled = lambda self, x, _f=cls.forward: 2.0 * _f(self, x)  # noqa: E731
    monkeypatch.setattr(cls, "forward", scaled)
    full, _ = _compress("llama", "svd-llm", False, monkeypatch)
    fast, calls = _compress("llama", "svd-llm", True, monkeypatch)
    assert calls == {"attn": 2 * (2 + 2), "mlp": 2 * (3 + 2), "dense_gate": 0}
    assert _same(full, fast)


def test_a_layer_trained_in_place_passes_on_its_trained_outputs(monkeypatch):
    """Lillama starts from rom's factors (recorded with replay) and trains them in place: the next
    layer must then be fed the trained layer's outputs, as it is without any replay."""
    full, _ = _compress("llama", "lillama", False, monkeypatch)
    fast, _ = _compress("llama", "lillama", True, monkeypatch)
    assert _same(full, fast)
