"""Streaming: a model read one layer at a time from its files gives the model compressed in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankdown
from rankdown import io
from rankdown.reference import reference_dir
from rankdown.arch import spec_for
from rankdown.engine import walk_layers
from rankdown.storage import MemoryStore, TensorStore
from rankdown.storage.folder import StreamedModel
from rankdown.stream import compress_folder, partial_folder
from tests.test_cli import ENV, last_json, rankdown as cli
from tests.tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)


def _folder(tmp_path: Path, family: str, shard: str | None = None) -> Path:
    path = tmp_path / family
    tiny_model(family).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.mark.parametrize("family,method,shard,mem", [
    ("llama", "rom", "100KB", None),  # sharded input; ROM's global allocation reads every layer twice
    ("llama-tied", "svd-llm", None, "0"),  # tied embeddings; every activation on disk
    ("qwen2", "rom", None, None),  # q/k/v biases
    ("opt", "svd-llm", "100KB", None),  # biases, learned positions, another layer list
])
def test_streamed_equals_in_memory(tmp_path, family, method, shard, mem):
    src = _folder(tmp_path, family, shard)
    # global: the statistics walk streamed twice (auto, the fisher allocation, is tests/test_stream_fisher.py)
    extra = {"allocation": "global"} if method == "rom" else {}
    config = rankdown.make_config(method, ratio=0.3, **extra)
    run = rankdown.RunSettings(batch_size=2, max_memory=mem)
    model = tiny_model(family)
    report = rankdown.compress(model, None, config, IDS, run=run, progress=False)
    rankdown.save(model, None, tmp_path / "memory", report)
    streamed, out = compress_folder(src, tmp_path / "streamed", config, IDS, run=run, progress=False)
    assert streamed.params_after == report.params_after and streamed.structure == report.structure
    a, b = io.load(tmp_path / "memory"), io.load(out)
    assert torch.equal(outputs(a, IDS), outputs(b, IDS))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([family, "memory", "streamed"])  # no work folder left


def test_half_precision_embeddings_stay_half_and_give_the_same_model(tmp_path, monkeypatch):
    """A float16 checkpoint's embedding table is read as stored (half the memory of the calibration
    pass) and widened row by row: the same model, bit for bit, as with the table read in float32."""
    src = tmp_path / "llama16"
    tiny_model("llama").to(torch.float16).save_pretrained(src)
    streamed = StreamedModel(src)
    streamed.load_outside()
    assert streamed.model.model.embed_tokens.weight.dtype == torch.float16
    assert streamed.model.model.embed_tokens(IDS[:1]).dtype == torch.float32
    streamed.drop_outside()
    assert not streamed.model.model.embed_tokens._forward_hooks
    config, run = rankdown.make_config("svd-llm", ratio=0.3), rankdown.RunSettings(batch_size=2)
    _, half = compress_folder(src, tmp_path / "half", config, IDS, run=run, progress=False, save_dtype=torch.float32)
    monkeypatch.setattr(StreamedModel, "_stored_narrower", lambda self, name: False)
    _, wide = compress_folder(src, tmp_path / "wide", config, IDS, run=run, progress=False, save_dtype=torch.float32)
    assert torch.equal(outputs(io.load(half), IDS), outputs(io.load(wide), IDS))


def test_only_one_layer_is_materialised_at_a_time(tmp_path):
    src = _folder(tmp_path, "llama")
    streamed = StreamedModel(src)
    real = lambda: sorted({n.split(".")[2] for n, p in streamed.model.named_parameters()
                           if n.startswith("model.layers.") and p.device.type != "meta"})
    assert real() == []
    streamed.load_outside()  # for the calibration pass: the input embeddings, never the output head
    assert streamed.model.model.embed_tokens.weight.device.type == "cpu"
    assert streamed.model.lm_head.weight.device.type == "meta"
    streamed.drop_outside()
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    streamed.load(1, streamed.layers[1])
    assert real() == ["1"]
    streamed.commit(1, streamed.layers[1], None)
    assert real() == []


@pytest.mark.slow  # two command-line runs on the reference; test_streamed_equals_in_memory checks the equality fast
def test_reference_folder_through_the_cli(tmp_path):
    """`rankdown compress FOLDER --out` streams by default and gives the in-memory model."""
    common = ["--method", "rom", "--allocation", "global", "--ratio", "0.3", "--calib", "reference", "--seqlen", "128", "--nsamples", "8",
              "-q", "--json"]
    res = last_json(cli("compress", str(reference_dir()), *common, "--out", str(tmp_path / "s")))
    assert res["streamed"] is True
    mem = last_json(cli("compress", str(reference_dir()), *common, "--no-stream", "--out", str(tmp_path / "m")))
    assert mem["streamed"] is False and mem["params_after"] == res["params_after"]
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(outputs(io.load(tmp_path / "s"), ids), outputs(io.load(tmp_path / "m"), ids))


def _broken(tmp_path: Path, how: str) -> Path:
    src = _folder(tmp_path, "llama", "100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / sorted(set(index["weight_map"].values()))[-1]
    if how == "missing shard":
        shard.unlink()
    elif how == "corrupt shard":
        shard.write_bytes(shard.read_bytes()[:50])
    elif how == "nan weight":
        tensors = load_file(shard)
        name = next(iter(tensors))
        tensors[name][0, 0] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("how,message", [
    ("missing shard", "missing from"),
    # a command-line run each; tests/test_cli_input.py refuses both in-process (fast)
    pytest.param("corrupt shard", "not a readable safetensors file", marks=pytest.mark.slow),
    pytest.param("nan weight", "NaN or Inf", marks=pytest.mark.slow),
])
def test_broken_folders_are_refused_and_nothing_is_written(tmp_path, how, message):
    src = _broken(tmp_path, how)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    proc = cli("compress", str(src), "--method", "svd", "--ratio", "0.3", "--out", str(tmp_path / "out"), "-q",
               check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before  # input untouched
    assert sorted(os.listdir(tmp_path)) == ["llama"]  # no output, no work folder


def test_stream_flag_errors(tmp_path):
    proc = cli("compress", "--method", "svd", "--ratio", "0.3", "--stream", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "--stream reads a local model folder" in proc.stderr
    src = _folder(tmp_path, "llama")
    proc = cli("compress", str(src), "--method", "svd", "--ratio", "0.3", "--stream", check=False)
    assert proc.returncode == 2 and "give --out" in proc.stderr


def test_fused_experts_fall_back_to_memory(tmp_path):
    src = _folder(tmp_path, "mixtral")
    res = last_json(cli("compress", str(src), "--method", "svd", "--ratio", "0.2", "--out", str(tmp_path / "o"),
                        "-q", "--json"))
    assert res["streamed"] is False and (tmp_path / "o" / "config.json").is_file()


def _resume_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rankdown.cli", "compress", str(reference_dir()), "--method", "rom", "--ratio", "0.3",
            "--calib", "reference", "--seqlen", "128", "--nsamples", "8", "--out", str(out), "-q", "--json", *extra]


@pytest.mark.slow  # four command-line runs; tests/test_nothing_lost.py resumes interrupted runs fast
def test_a_killed_run_resumes_and_gives_the_same_model(tmp_path):
    out = tmp_path / "out"
    state = partial_folder(out) / "state.json"
    proc = subprocess.Popen(_resume_cmd(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it once two layers are written
        try:
            if len(json.loads(state.read_text())["layers"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = len(json.loads(state.read_text())["layers"])
    assert 2 <= done < 6 and not out.exists(), "the run was not killed mid-way"

    cmd = _resume_cmd(out)
    cmd[cmd.index("--ratio") + 1] = "0.4"
    other = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert other.returncode == 2 and "method.ratio: 0.3 then, 0.4 now" in other.stderr, other.stderr
    assert state.is_file()  # the refused run left the partial one alone

    resumed = subprocess.run(_resume_cmd(out), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} layers" in resumed.stdout
    assert not partial_folder(out).exists()
    whole = subprocess.run(_resume_cmd(tmp_path / "whole"), env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert last_json(resumed)["params_after"] == last_json(whole)["params_after"]
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(outputs(io.load(out), ids), outputs(io.load(tmp_path / "whole"), ids))


def test_restart_discards_a_partial_run(tmp_path):
    out = tmp_path / "out"
    work = partial_folder(out)
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"fingerprint": {"method.ratio": 0.5}, "ranks": None, "layers": {}}))
    res = subprocess.run(_resume_cmd(out, "--restart"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not work.exists() and (out / "config.json").is_file()


# ----------------------------------------------------------------------------- the engine's layer store
class _Finished(MemoryStore):
    """A store that says layer 0 was finished by an earlier run (as a resumed one does)."""

    def __init__(self, model, records):
        super().__init__(model)
        self.records, self.committed = records, []

    def load(self, i, layer):
        return self.records if i == 0 else None

    def commit(self, i, layer, records):
        self.committed.append((i, records))
        super().commit(i, layer, records)


def test_a_layer_the_store_gives_finished_is_run_not_visited_and_carry_is_freed():
    model = tiny_model("llama")
    spec = spec_for(model)
    done = {"modules": {"model.layers.0.mlp.down_proj": {"type": "x"}}, "guards": {}, "seconds": 1.0}
    store, visited, left = _Finished(model, done), [], []

    def visit(ctx):
        visited.append(ctx.index)
        assert ctx.batches == 2 and ctx.layer_inputs()[0].shape == (4, 32, 64)  # layer 0 ran to feed layer 1
        ctx.carry["x"] = TensorStore(ctx.budget, [torch.ones(3)])
        left.append(ctx.carry["x"])

    seconds, records = walk_layers(model, spec, visit, IDS, torch.ones_like(IDS), 4, "cpu", store, progress=False,
                                   write=True)
    assert visited == [1] and len(seconds) == 2
    assert records[0] is done and records[1]["modules"] == {} and set(records[1]) == {"modules", "guards", "seconds"}
    assert store.committed == [(0, None), (1, records[1])]  # a finished layer is not written again
    assert len(left[0]) == 0  # what a visit left for a next layer is freed with the walk


def test_the_memory_store_puts_each_layer_back_home():
    """After a visit on another device (meta stands for a GPU: nothing is moved back from it here,
    the calls are recorded) each layer, and at the end the model, go back where the weights were."""
    model = tiny_model("llama")
    moved = []
    for mod in (model, model.model.layers[1]):
        mod.to = lambda device, _m=mod: moved.append((_m, torch.device(device)))
    store = MemoryStore(model)
    store.begin(torch.device("meta"))
    store.commit(1, model.model.layers[1], None)
    store.end()
    assert moved == [(model.model.layers[1], torch.device("cpu")), (model, torch.device("cpu"))]
    moved.clear()
    store.begin(torch.device("cpu"))  # computed where the weights are: nothing to move
    store.commit(1, model.model.layers[1], None)
    store.end()
    assert moved == []
