"""What changes when the layer loop runs on another device than the weights (``--device cuda``).

This machine has no GPU: where a contract can be seen without one, the meta device stands in for it
(moving a real tensor there makes a new tensor, as moving it to a GPU does)."""

import pytest
import torch
from torch import nn

import rankdown.engine.capture as engine
from rankdown import distributed
from rankdown.engine.capture import _place_outside_layers, capture, to_device
from rankdown.engine.replay import _Replay
from rankdown.config import ConfigError
from tiny import tiny_ids, tiny_model

META = torch.device("meta")


def _params(model):
    return dict(model.named_parameters(remove_duplicate=False))


def test_the_layers_inputs_move_but_not_a_streamed_head_nor_an_untied_one():
    model = tiny_model("llama")
    before = _params(model)
    _place_outside_layers(model, "model.layers", torch.device("cpu"))  # already there: nothing replaced
    assert all(p is before[n] for n, p in _params(model).items())

    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))  # as streamed
    head = model.lm_head.weight
    _place_outside_layers(model, "model.layers", META)
    after = _params(model)
    assert after["model.embed_tokens.weight"].is_meta and after["model.norm.weight"].is_meta
    assert after["lm_head.weight"] is head  # a meta tensor has no data to copy: left alone
    assert all(p is before[n] and not p.is_meta for n, p in after.items() if n.startswith("model.layers."))
    assert model.model.rotary_emb.inv_freq.is_meta  # buffers go too

    model = tiny_model("llama")  # not streamed: the head the calibration pass never reaches stays behind
    head = model.lm_head.weight
    _place_outside_layers(model, "model.layers", META)
    assert model.lm_head.weight is head and not head.is_meta and model.model.embed_tokens.weight.is_meta

    model = tiny_model("llama-tied")  # a head tied to the input embeddings goes with them, still tied
    _place_outside_layers(model, "model.layers", META)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta


def test_a_tensor_met_again_is_moved_once():
    t, u = torch.randn(3, 4), torch.randn(2)
    memo: dict = {}
    a = to_device({"pe": (t, t), "u": u}, META, memo)
    b = to_device([t, (u,)], META, memo)
    assert a["pe"][0].is_meta and a["pe"][0] is a["pe"][1] is b[0] and a["u"] is b[1][0]
    c = to_device((t, t), META)  # without a memo every occurrence is its own copy
    assert c[0] is not c[1]


def test_capture_keeps_one_host_copy_of_what_the_layers_share(monkeypatch):
    """The rotary tables (and a mask) the model hands every layer are kept once per batch, not once
    per layer: on a GPU each layer's ``.to("cpu")`` would make its own copy (8.6 GB for an 8B model
    at 128 x 2048 tokens)."""
    memos = []

    def spy(obj, device, memo=None):  # to meta, where only the memo can make two results one object
        memos.append(memo)
        return to_device(obj, META, memo)

    monkeypatch.setattr(engine, "to_device", spy)
    model = tiny_model("llama")
    ids = tiny_ids(8, 32)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a padded row: every layer gets the 4-D mask
    _, args, kwargs, _ = capture(model, model.model.layers, ids, mask, 4, torch.device("cpu"))
    assert memos and all(m is not None for m in memos)
    for b in range(2):
        cos0, cos1 = kwargs[0][b]["position_embeddings"][0], kwargs[1][b]["position_embeddings"][0]
        assert cos0.is_meta and cos0 is cos1
    shared = [k for k, v in kwargs[0][0].items() if isinstance(v, torch.Tensor) and v is kwargs[1][0][k]]
    assert "attention_mask" in shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_replay_check_allows_the_dtypes_rounding_and_nothing_more(dtype):
    """A parent's output computed by another kernel (a GPU's GEMM on thousands of rows, where the
    check runs 16) differs from ``last(x)`` in the last bits of the dtype: still the parent's last
    linear. One that is scaled after it is not."""
    torch.manual_seed(0)
    last = nn.Linear(64, 32).to(dtype)
    x = torch.randn(4, 8, 64).to(dtype)
    with torch.no_grad():
        y = last(x)
    up = torch.full_like(y, float("inf"))
    one_ulp = torch.nextafter(y, up)  # the next representable value: one rounding step away
    assert _Replay.check(y, last, x) == -1
    assert _Replay.check((one_ulp, None), last, x) == 1
    assert _Replay.check(y * 1.1, last, x) is None
    assert _Replay.check((y, torch.ones(1)), last, x) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, capsys):
    """compress, eval, bench and the speed comparison: before any model is loaded or written."""
    from rankdown import cli
    from rankdown.benchmark import BenchSettings, run_bench
    from rankdown.eval.speed import compare_speed

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        distributed.setup("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_bench(BenchSettings(methods=["svd"], ratios=[0.2], device="cuda"), tmp_path / "bench")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        compare_speed({"dense": tiny_model("llama")}, device="cuda")
    capsys.readouterr()
    for command in (["compress", "--method", "svd", "--ratio", "0.2", "--out", str(tmp_path / "out")],
                    ["eval", "reference", "--ppl", "reference-heldout", "--device", "cuda"]):
        assert cli.main([*command, "--device", "cuda", "-q"] if command[0] == "compress" else command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU" in err[0] and "use --device cpu" in err[0]
    assert list(tmp_path.iterdir()) == []
