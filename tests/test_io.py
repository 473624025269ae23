"""rankdown.io: saved folders reload bit-exactly, with rankdown or with trust_remote_code alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rankdown import io
from rankdown.io import writing
from rankdown.nn.portable import LowRankLinear, UnfusedExperts, unfuse_experts

TEXT = ["the cat sat on the mat", "a dog ran far away from the cat", "on the mat a dog sat"]
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                      bos_token="<s>", eos_token="</s>")


def _lowrank(model: torch.nn.Module, path: str, rank: int = 8) -> dict:
    """Replace the linear at ``path`` by a LowRankLinear with random factors; return its structure entry."""
    old = model.get_submodule(path)
    new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None, dtype=old.weight.dtype)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.2)
    model.set_submodule(path, new)
    return {"type": "lowrank", "in": old.in_features, "out": old.out_features, "rank": rank,
            "bias": old.bias is not None}


def _compressed(name: str) -> tuple[torch.nn.Module, dict]:
    """A tiny random model of family ``name`` with some layers replaced; and its structure."""
    torch.manual_seed(0)
    structure: dict = {"modules": {}}
    if name in ("llama", "llama_tied", "llama_head", "llama_sharded"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA, tie_word_embeddings=name != "llama"))
        paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
        paths += ["lm_head"] if name == "llama_head" else []
    elif name == "opt":  # fc1 has a bias; saved in bfloat16
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=64,
                                               word_embed_proj_dim=64)).to(torch.bfloat16)
        paths = ["model.decoder.layers.0.fc1", "model.decoder.layers.1.self_attn.v_proj"]
    elif name == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**LLAMA, num_local_experts=4, num_experts_per_tok=2))
        structure["unfused_experts"] = ["model.layers.1.mlp.experts"]  # layer 0 keeps its fused experts
        unfuse_experts(model, "model.layers.1.mlp.experts")
        paths = ["model.layers.1.mlp.experts.experts.2.down_proj", "model.layers.0.self_attn.o_proj"]
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
        paths = ["encoder.layer.0.intermediate.dense"]
    else:
        raise KeyError(name)
    for path in paths:
        structure["modules"][path] = _lowrank(model, path)
    return model.eval(), structure


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)


def _impl(model: torch.nn.Module) -> tuple:
    """The attention and experts implementations transformers chose (they change the numerics)."""
    return model.config._attn_implementation, getattr(model.config, "_experts_implementation", None)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


NAMES = ["llama", "llama_tied", "llama_head", "llama_sharded", "opt", "mixtral", "bert"]
IDS = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))
RECORD = {"method": "svd", "config": {"ratio": 0.3}, "seed": 0, "calibration": "none", "params_before": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict]:
    """Every tiny model saved once: its folder, structure, and in-memory outputs."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in NAMES:
        model, structure = _compressed(name)
        causal = name != "bert"
        shard = "100KB" if name == "llama_sharded" else "5GB"
        folder = io.save(model, _tokenizer() if name == "llama_tied" else None, root / name,
                         {**RECORD, "params_after": _params(model)}, structure, max_shard_size=shard)
        out[name] = {"dir": folder, "structure": structure, "out": _out(model, IDS), "params": _params(model),
                     "causal": causal, "gen": _generate(model, IDS[:1]) if causal else None,
                     "dtype": next(model.parameters()).dtype, "impl": _impl(model)}
    return out


@pytest.mark.parametrize("name", NAMES)
def test_load_is_exact_and_keeps_the_record(saved, name):
    s = saved[name]
    model = io.load(s["dir"])
    assert not model.training
    assert next(model.parameters()).dtype == s["dtype"]
    assert _impl(model) == s["impl"]
    assert torch.equal(_out(model, IDS), s["out"])
    assert _params(model) == s["params"]
    assert model.config.rankdown["structure"] == s["structure"]
    assert model.config.model_type == model.config.rankdown["base_model_type"]  # stock type in-process
    if s["causal"]:
        assert torch.equal(_generate(model, IDS[:1]), s["gen"])


@pytest.mark.parametrize("name", NAMES)
def test_config_json_records_structure_and_provenance(saved, name):
    s = saved[name]
    cfg = json.loads((s["dir"] / "config.json").read_text())
    rec = cfg["rankdown"]
    assert rec == io.read_record(s["dir"])
    assert rec["structure"] == s["structure"]
    assert {k: rec[k] for k in RECORD} == RECORD and rec["params_after"] == s["params"]
    assert rec["format"] == 1 and set(rec["versions"]) == {"rankdown", "torch", "transformers", "safetensors",
                                                           "python"}
    assert cfg["model_type"] == "rankdown_" + rec["base_model_type"]
    wrapper = "RankdownForCausalLM" if s["causal"] else "RankdownModel"
    assert cfg["architectures"] == [wrapper]
    auto = "AutoModelForCausalLM" if s["causal"] else "AutoModel"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_rankdown.RankdownConfig",
                               auto: f"modeling_rankdown.{wrapper}"}
    files = set(os.listdir(s["dir"]))
    assert {"config.json", "configuration_rankdown.py", "modeling_rankdown.py"} <= files
    shards = [f for f in files if f.endswith(".safetensors")]
    if name == "llama_sharded":
        assert len(shards) > 2 and "model.safetensors.index.json" in files
    else:
        assert shards == ["model.safetensors"]
    assert ("tokenizer.json" in files) == (name == "llama_tied")
    assert not [f for f in os.listdir(s["dir"].parent) if f.startswith(".")]  # no temp folder left


def test_factorised_tied_head_is_saved_untied(saved):
    assert json.loads((saved["llama_tied"]["dir"] / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((saved["llama_head"]["dir"] / "config.json").read_text())["tie_word_embeddings"] is False


REMOTE = r"""
import sys
sys.modules["rankdown"] = None  # only the folder's own code may run
import json, os, torch
torch.set_num_threads(int(os.environ["RANKDOWN_TEST_THREADS"]))  # same float summation order as the parent
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
try:
    import rankdown
    raise SystemExit("rankdown is importable in the subprocess")
except ImportError:
    pass
jobs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
results = {}
for name, job in jobs.items():
    auto = AutoModelForCausalLM if job["causal"] else AutoModel
    model, info = auto.from_pretrained(job["dir"], trust_remote_code=True, output_loading_info=True)
    model.eval()
    r = {"info": {k: sorted(map(str, v)) for k, v in info.items()}, "module": type(model).__module__,
         "config": type(AutoConfig.from_pretrained(job["dir"], trust_remote_code=True)).__name__,
         "params": sum(p.numel() for p in model.parameters()),
         "impl": (model.config._attn_implementation, getattr(model.config, "_experts_implementation", None))}
    with torch.no_grad():
        o = model(input_ids=ids)
    r["out"] = o.logits if job["causal"] else o.last_hidden_state
    if job["causal"]:
        r["gen"] = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5, do_sample=False)
    if job["tokenizer"]:
        r["tok"] = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=True)(jobs[name]["text"])["input_ids"]
    results[name] = r
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def remote(saved, tmp_path_factory) -> dict[str, dict]:
    """Load every saved folder in one subprocess that cannot import rankdown."""
    work = tmp_path_factory.mktemp("remote")
    torch.save(IDS, work / "ids.pt")
    jobs = {n: {"dir": str(s["dir"]), "causal": s["causal"], "tokenizer": n == "llama_tied", "text": TEXT[0]}
            for n, s in saved.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               RANKDOWN_TEST_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(jobs), str(work / "ids.pt"), str(work / "r.pt")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / "r.pt")


@pytest.mark.parametrize("name", NAMES)
def test_trust_remote_code_without_rankdown_is_exact(saved, remote, name):
    s, r = saved[name], remote[name]
    assert r["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert r["module"].startswith("transformers_modules.") and r["config"] == "RankdownConfig"
    assert r["impl"] == s["impl"]  # e.g. fused Mixtral experts stay on grouped_mm, not eager
    assert torch.equal(r["out"], s["out"])
    assert r["params"] == s["params"]
    if s["causal"]:
        assert r["gen"].shape[1] > IDS.shape[1] and torch.equal(r["gen"], s["gen"])


def test_tokenizer_travels_with_the_model(remote):
    assert remote["llama_tied"]["tok"] == _tokenizer()(TEXT[0])["input_ids"]


def test_existing_folder_is_refused_and_untouched(tmp_path):
    model, structure = _compressed("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(io.OutputExistsError, match="--overwrite"):
        io.save(model, None, out, RECORD, structure)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert issubclass(io.OutputExistsError, FileExistsError)


def test_overwrite_replaces_the_folder_completely(tmp_path):
    """--overwrite replaces a folder rankdown saved (a folder holding anything else is refused: see
    tests/test_nothing_lost.py), and only once the new one is complete."""
    model, structure = _compressed("llama")
    out = tmp_path / "out"
    io.save(_compressed("llama_sharded")[0], None, out, RECORD, _compressed("llama_sharded")[1],
            max_shard_size="100KB")
    assert len(os.listdir(out)) > 5
    assert io.save(model, None, out, RECORD, structure, overwrite=True) == out
    assert sorted(os.listdir(out)) == ["config.json", "configuration_rankdown.py", "generation_config.json",
                                       "model.safetensors", "modeling_rankdown.py"]
    assert io.read_record(out)["files"] == sorted(os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert torch.equal(_out(io.load(out), IDS), _out(model, IDS))


def test_empty_existing_folder_is_used(tmp_path):
    model, structure = _compressed("llama")
    (tmp_path / "out").mkdir()
    io.save(model, None, tmp_path / "out", RECORD, structure)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, overwrite):
    model, structure = _compressed("llama")
    out = tmp_path / "out"
    if overwrite:  # an earlier save, to be replaced
        io.save(model, None, out, {**RECORD, "method": "old"}, structure)
        before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writing, "_modeling_source", boom)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        io.save(model, None, out, RECORD, structure, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_structure_that_does_not_match_the_model_is_refused(tmp_path):
    model, structure = _compressed("llama")
    structure["modules"]["model.layers.1.self_attn.k_proj"] = {"type": "lowrank", "in": 64, "out": 32, "rank": 8,
                                                               "bias": False}
    with pytest.raises(ValueError, match="k_proj"):
        io.save(model, None, tmp_path / "out", RECORD, structure)
    assert os.listdir(tmp_path) == []


def test_missing_extra_or_misshapen_tensor_is_a_clear_error(tmp_path):
    model, structure = _compressed("llama")
    out = io.save(model, None, tmp_path / "out", RECORD, structure)
    weights = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.A.weight"
    save_file({k: v for k, v in weights.items() if k != key}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(io.ModelFolderError, match=r"missing keys: .*q_proj\.A\.weight.*corrupt"):
        io.load(out)
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, out / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(io.ModelFolderError, match=r"unexpected keys: model\.extra\.weight"):
        io.load(out)
    save_file({**weights, key: torch.zeros(4, 64)}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(io.ModelFolderError, match=r"mismatched keys: .*q_proj\.A\.weight"):
        io.load(out)


def test_dtype_override_and_plain_folders(tmp_path):
    model, structure = _compressed("llama")
    out = io.save(model, None, tmp_path / "small", RECORD, structure)
    half = io.load(out, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert isinstance(half.get_submodule("model.layers.0.self_attn.q_proj"), LowRankLinear)

    torch.manual_seed(0)
    plain = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()
    plain.save_pretrained(tmp_path / "plain")
    assert io.read_record(tmp_path / "plain") is None
    back = io.load(tmp_path / "plain")
    assert type(back) is tf.LlamaForCausalLM and torch.equal(_out(back, IDS), _out(plain, IDS))


def test_a_model_loaded_with_remote_code_saves_again(saved, tmp_path, monkeypatch):
    # keep the remote code out of ~/.cache (transformers read HF_MODULES_CACHE when it was imported)
    monkeypatch.setattr(tf.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    first = tf.AutoModelForCausalLM.from_pretrained(saved["mixtral"]["dir"], trust_remote_code=True).eval()
    structure = saved["mixtral"]["structure"]
    again = io.save(first, None, tmp_path / "again", RECORD, structure)
    assert io.read_record(again)["structure"] == structure
    assert io.read_record(again)["base_architecture"] == "MixtralForCausalLM"
    assert torch.equal(_out(io.load(again), IDS), saved["mixtral"]["out"])


def test_record_must_be_json(tmp_path):
    model, structure = _compressed("llama")
    with pytest.raises(TypeError, match="record must hold only JSON values"):
        io.save(model, None, tmp_path / "out", {"dtype": torch.float16}, structure)
    assert os.listdir(tmp_path) == []


def test_extra_files_are_written_beside_the_model(tmp_path):
    model, structure = _compressed("llama")
    curves = {"model.layers.0": [0.5, 0.25]}
    io.save(model, None, tmp_path / "out", RECORD, structure, extra_files={"losses.json": curves})
    assert json.loads((tmp_path / "out" / "losses.json").read_text()) == curves
    for bad in ("../x.json", "config.json", "notes.txt"):
        with pytest.raises(ValueError, match="plain"):
            io.save(model, None, tmp_path / "bad", RECORD, structure, extra_files={bad: 1})
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_unfused_experts_survive_in_process(saved):
    model = io.load(saved["mixtral"]["dir"])
    assert isinstance(model.get_submodule("model.layers.1.mlp.experts"), UnfusedExperts)
    assert not isinstance(model.get_submodule("model.layers.0.mlp.experts"), UnfusedExperts)


def test_bad_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(io.ModelFolderError, match="not a folder"):
        io.load(tmp_path / "nope")
    with pytest.raises(io.ModelFolderError, match="no config.json"):
        io.read_record(tmp_path)
