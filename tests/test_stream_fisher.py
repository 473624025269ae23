"""The fisher allocation while streaming (rankdown/engine/backward.py): the loss gradients taken one
layer at a time equal the whole model's backward pass, so ``auto`` means fisher both ways, and a
fallback is a warning and said in the record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import rankdown
from rankdown import io
from rankdown.api import find_targets
from rankdown.arch import spec_for
from rankdown.calib import CalibrationData
from rankdown.engine import PlanContext
from rankdown.sensitivity import output_fisher
from rankdown.storage import MemoryBudget
from rankdown.storage.folder import StreamedModel
from rankdown.stream import compress_folder
from tests.tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)


def _padded() -> CalibrationData:
    mask = torch.ones_like(IDS)
    mask[1, 20:] = 0  # padding: its tokens predict nothing
    return CalibrationData(IDS, mask, "tensor")


def _real_layers(streamed: StreamedModel) -> set[str]:
    path = streamed.layers_path + "."
    return {n[len(path):].split(".")[0] for n, p in streamed.model.named_parameters()
            if n.startswith(path) and p.device.type != "meta"}


@pytest.mark.parametrize("family,mem", [("llama", None), ("llama-tied", "0"), ("opt", None), ("gemma2", None)])
def test_streamed_fisher_equals_in_memory(tmp_path, monkeypatch, family, mem):
    data = _padded()
    model = tiny_model(family)
    spec = spec_for(model)
    targets = find_targets(model, spec)
    memory = output_fisher(PlanContext(model, spec, lambda: data, 3, "cpu", False), targets, 0)
    model.save_pretrained(tmp_path / family)
    streamed = StreamedModel(tmp_path / family)
    seen: list[set[str]] = []  # the layers in memory each time one is read
    load = StreamedModel.load
    monkeypatch.setattr(StreamedModel, "load", lambda self, i, layer: (load(self, i, layer), seen.append(_real_layers(self)))[0])
    budget = MemoryBudget(None if mem is None else int(mem))
    context = PlanContext(streamed.model, streamed.spec, lambda: data, 3, "cpu", False, budget, streamed)
    with budget:
        got = output_fisher(context, targets, 0)
    assert sorted(got) == sorted(memory)
    for path, d in memory.items():
        assert d.dtype == torch.float64 and float(d.max()) > 0
        torch.testing.assert_close(got[path], d, rtol=1e-5, atol=0)
    n = len(streamed.layers)
    assert len(seen) == 2 * n and all(len(s) == 1 for s in seen)  # forward then backward, one layer at a time
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # nothing left behind
    assert mem is None or budget.spilled > 0


def test_layerwise_fisher_in_memory_equals_the_whole_backward():
    data = _padded()
    model = tiny_model("qwen2")
    spec = spec_for(model)
    targets = find_targets(model, spec)
    context = PlanContext(model, spec, lambda: data, 3, "cpu", False)
    whole = output_fisher(context, targets, 0, layerwise=False)
    layerwise = output_fisher(context, targets, 0, layerwise=True)
    for path, d in whole.items():
        torch.testing.assert_close(layerwise[path], d, rtol=1e-5, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # the flags given back
    assert all(p.grad is None for p in model.parameters())  # no weight gradient built


def test_streamed_rom_auto_runs_fisher_and_gives_the_in_memory_model(tmp_path):
    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src)
    config = rankdown.make_config("rom", ratio=0.3)  # allocation auto
    run = rankdown.RunSettings(batch_size=2)
    model = tiny_model("llama")
    report = rankdown.compress(model, None, config, IDS, run=run, progress=False)
    streamed, out = compress_folder(src, tmp_path / "streamed", config, IDS, run=run, progress=False)
    assert streamed.structure == report.structure  # the same ranks
    assert torch.equal(outputs(io.load(out), IDS), outputs(model, IDS))
    record = json.loads((out / "config.json").read_text())["rankdown"]
    assert record["config"]["allocation"] == "auto"
    assert record["allocation"]["allocation"] == "fisher" and record["allocation"]["requested"] == "auto"
    assert "fallback_because" not in record["allocation"]
    assert record["allocation"]["params_budget"] == round(report.params_before * 0.7)
    assert report.allocation == streamed.allocation


def test_streamed_modegpt_fisher_equals_in_memory(tmp_path):
    """MoDeGPT's --allocation fisher reads the same curves: it streams, to the same layer sparsities."""
    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src)
    config = rankdown.make_config("modegpt", ratio=0.3, allocation="fisher")
    run = rankdown.RunSettings(batch_size=2)
    model = tiny_model("llama")
    report = rankdown.compress(model, None, config, IDS, run=run, progress=False)
    streamed, out = compress_folder(src, tmp_path / "streamed", config, IDS, run=run, progress=False)
    assert streamed.structure == report.structure
    assert streamed.artifacts == report.artifacts  # modegpt_allocation.json: the sparsity of every layer
    torch.testing.assert_close(outputs(io.load(out), IDS), outputs(model, IDS), rtol=1e-5, atol=1e-6)
    assert streamed.allocation["allocation"] == "fisher"


def test_streamed_fwsvd_equals_in_memory(tmp_path):
    """FWSVD's row weights are the same gradients: it streams now, to the same model."""
    from rankdown.loading import should_stream

    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src)
    assert should_stream(str(src), tmp_path / "out", "fwsvd")
    config, run = rankdown.make_config("fwsvd", ratio=0.3), rankdown.RunSettings(batch_size=2)
    model = tiny_model("llama")
    report = rankdown.compress(model, None, config, IDS, run=run, progress=False)
    streamed, out = compress_folder(src, tmp_path / "streamed", config, IDS, run=run, progress=False)
    assert streamed.structure == report.structure
    torch.testing.assert_close(outputs(io.load(out), IDS), outputs(model, IDS), rtol=1e-5, atol=1e-6)


def test_auto_without_a_head_warns_and_records_the_fallback(tmp_path, caplog):
    model = tiny_model("bert")  # an encoder: no loss to take
    config = rankdown.make_config("rom", ratio=0.3)
    with caplog.at_level(logging.WARNING):
        report = rankdown.compress(model, None, config, IDS, run=rankdown.RunSettings(batch_size=2), progress=False)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "instead of fisher" in r.getMessage()]
    assert len(warned) == 1 and "global instead of fisher" in warned[0].getMessage()
    assert "no language-modelling head" in warned[0].getMessage()
    assert report.allocation["allocation"] == "global" and report.allocation["requested"] == "auto"
    assert "no language-modelling head" in report.allocation["fallback_because"]
    assert report.record()["allocation"] == report.allocation


def test_an_explicit_allocation_is_recorded_as_asked():
    report = rankdown.compress(tiny_model("llama"), None, rankdown.make_config("svd-llm", ratio=0.3), IDS,
                               run=rankdown.RunSettings(batch_size=2), progress=False)
    assert report.allocation["allocation"] == "uniform" and "requested" not in report.allocation
