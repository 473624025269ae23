"""GGUF checkpoints as rankdown's input, on the real SmolLM2-135M-Instruct (Q4_1, from the package
index: see rankdown/realmodels.py): loaded dequantized, compressed in memory, recorded; and the
errors a user can meet (several .gguf files, a damaged one, no gguf package) as one line, exit 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
PARAMS = 134_515_008  # SmolLM2-135M-Instruct, tied embeddings counted once
PROMPT = "The capital of France is"


def rankdown(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankdown.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


@pytest.fixture(scope="session")
def from_gguf(smollm2_gguf):
    """(model, tokenizer) of the .gguf, through the CLI's loader (about 30 s: loaded once)."""
    from rankdown.loading import load_model

    return load_model(str(smollm2_gguf))


@pytest.fixture(scope="module")
def compress_run(smollm2_gguf, tmp_path_factory):
    """`rankdown compress FILE.gguf`, svd on layer 0 only (1% of the parameters: loading dominates),
    started in the background so that its load of the file overlaps the in-process one (2 cores)."""
    where = tmp_path_factory.mktemp("gguf")
    out = where / "svd"
    with open(where / "stdout", "w") as so, open(where / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "rankdown.cli", "compress", str(smollm2_gguf), "--method", "svd",
                                 "--ratio", "0.01", "--exclude", r"layers\.([1-9]|[12][0-9])\.", "--out", str(out),
                                 "--json", "-q"], stdout=so, stderr=se, text=True,
                                env={**ENV, "OMP_NUM_THREADS": "1"})  # the other core loads here
    yield out, proc, where
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def compressed(compress_run):
    out, proc, where = compress_run
    proc.wait(timeout=600)
    assert proc.returncode == 0, (where / "stderr").read_text()[-3000:]
    return out, json.loads((where / "stdout").read_text().strip().splitlines()[-1])


# compress_run first: the command loads the file in the background while from_gguf loads it here
@pytest.mark.slow  # loads the real model
def test_gguf_loads_dequantized_and_saveable_like_the_cached_folder(compress_run, from_gguf, smollm2_dir):
    import rankdown as rd
    from rankdown.allocate import count_params

    model, tok = from_gguf
    assert type(model).__name__ == "LlamaForCausalLM" and count_params(model) == PARAMS
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    cached = rd.load(smollm2_dir, dtype=torch.float32)
    cached_tok = rd.load_tokenizer(smollm2_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, cached_tok(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        a, b = model(ids).logits, cached(ids).logits
    assert torch.equal(a, b)
    assert tok.decode(a[0, -1].argmax()) == " Paris"  # NOTES.md: it answers "Paris."


@pytest.mark.slow  # loads the real model
def test_compress_a_gguf_file_records_it_and_saves_a_loadable_folder(compressed, from_gguf):
    import rankdown as rd
    from rankdown.allocate import count_params

    out, res = compressed
    assert res["streamed"] is False and res["params_before"] == PARAMS and res["modules_replaced"] == 7
    rec = json.loads((out / "config.json").read_text())["rankdown"]
    assert rec["source"] == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "Q4_1"}

    small = rd.load(out)
    assert count_params(small) == res["params_after"] < PARAMS
    # --save-dtype auto: bfloat16 (a 94 MB Q4 file must not become 538 MB of float32)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16} and res["save_dtype"] == "bfloat16"
    assert res["bytes_on_disk"] < 2.01 * PARAMS
    dense, _ = from_gguf
    kept = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(small.get_parameter(kept), dense.get_parameter(kept).to(torch.bfloat16))
    assert torch.equal(small.model.embed_tokens.weight, dense.model.embed_tokens.weight.to(torch.bfloat16))
    # the replaced weight is the GGUF weight's best rank-r approximation (Eckart-Young)
    W = dense.model.layers[0].mlp.down_proj.weight.double()
    low = small.model.layers[0].mlp.down_proj
    s = torch.linalg.svdvals(W)
    err = torch.linalg.matrix_norm(W - low.B.weight.double() @ low.A.weight.double())
    assert err.item() == pytest.approx(s[low.rank:].square().sum().sqrt().item(), rel=1e-2)  # factors in bfloat16
    assert rd.load_tokenizer(out)(PROMPT).input_ids == from_gguf[1](PROMPT).input_ids


def test_a_folder_with_two_gguf_files_is_one_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.Q4_0.gguf").write_bytes(b"GGUF")
    (src / "b.Q8_0.gguf").write_bytes(b"GGUF")
    proc = rankdown("compress", str(src), "--method", "svd", "--ratio", "0.1", "--out", str(tmp_path / "o"), "-q")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "2 .gguf files" in err[0] and "a.Q4_0.gguf" in err[0] and "b.Q8_0.gguf" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["eval", "{m}", "--ppl", "reference-heldout"], ["generate", "{m}", "--prompt", "x"],
                                     ["inspect", "{m}"], ["bench", "{m}", "--methods", "svd", "--out", "{m}/b"]])
def test_every_command_refuses_a_folder_with_two_gguf_files(tmp_path, capsys, command):
    from rankdown import cli

    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    rc = cli.main([c.format(m=tmp_path) for c in command])
    err = capsys.readouterr().err
    assert rc == 2 and "2 .gguf files (a.gguf, b.gguf)" in err


@pytest.mark.parametrize("damage", ["junk", "truncated header", "truncated data"])
def test_a_damaged_gguf_is_one_error(smollm2_gguf, tmp_path, capsys, damage):
    from rankdown import cli

    bad = tmp_path / "model.gguf"
    if damage == "junk":
        bad.write_bytes(b"not a gguf file")
    else:
        shutil.copyfile(smollm2_gguf, bad)
        os.truncate(bad, 65536 if damage == "truncated header" else bad.stat().st_size * 9 // 10)
    rc = cli.main(["compress", str(bad), "--method", "svd", "--ratio", "0.1", "-q", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "not a readable GGUF file" in err[0]


def test_a_missing_gguf_file_is_one_error(tmp_path, capsys):
    from rankdown import cli

    assert cli.main(["eval", str(tmp_path / "none.gguf"), "--ppl", "reference-heldout"]) == 2
    assert "none.gguf: no such GGUF file" in capsys.readouterr().err


def test_without_the_gguf_package_a_gguf_is_one_error(tmp_path, capsys, monkeypatch):
    from rankdown import cli

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    rc = cli.main(["generate", str(tmp_path / "m.gguf"), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'rankdown[gguf]'" in err[0]


def test_inspect_names_the_quantization_and_stream_is_refused(smollm2_gguf, capsys, tmp_path):
    from rankdown import cli

    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)  # a folder holding one .gguf (the cache may hold more)
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["compressed"] is False and res["quantization"] == "Q4_1" and res["architecture"] == "llama"
    assert cli.main(["compress", str(smollm2_gguf), "--method", "svd", "--ratio", "0.1", "--stream", "--out", "x"]) == 2
    assert "drop --stream" in capsys.readouterr().err


@pytest.mark.slow  # loads the real model
def test_generate_reads_a_gguf(smollm2_gguf, from_gguf, capsys, monkeypatch):
    """The command's path to the file goes through the same loader (its model reused: one load)."""
    from rankdown import cli, gguf_source

    seen = []
    monkeypatch.setattr(gguf_source, "load", lambda file, dtype: seen.append(file) or from_gguf)
    assert cli.main(["generate", str(smollm2_gguf), "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert seen == [smollm2_gguf] and capsys.readouterr().out.startswith(" Paris")


# -- a tiny GGUF written here: the fast tier's GGUF path, with no real model needed -----------------------------
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_rope_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter stores q and k with each head's rotary halves interleaved; transformers
    undoes it when it reads the file."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of an F32 llama .gguf without a tokenizer, the transformers model it was written from)."""
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY)
    model = LlamaForCausalLM(cfg).eval()
    sd = model.state_dict()
    path = tmp_path_factory.mktemp("tiny-gguf") / "src" / "tiny.gguf"
    path.parent.mkdir()
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)  # the config's default
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, name in _GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = _llama_cpp_rope_order(t, cfg.num_attention_heads if name == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t.numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def test_a_gguf_written_here_loads_as_the_model_it_came_from(tiny_gguf):
    from rankdown import gguf_source

    path, model = tiny_gguf
    assert gguf_source.describe(path) == {"gguf_file": "tiny.gguf", "quantization": "F32", "architecture": "llama",
                                          "tensors": 21, "has_tokenizer": False}
    loaded, tokenizer = gguf_source.load(path)
    assert tokenizer is None and not hasattr(loaded.config, "quantization_config")
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_compress_a_gguf_file_gives_the_in_memory_model_in_a_loadable_folder(tiny_gguf, tmp_path, capsys):
    import rankdown as rd
    from rankdown import cli, gguf_source
    from rankdown.methods import make_config

    path, _ = tiny_gguf
    out = tmp_path / "svd"
    assert cli.main(["compress", str(path), "--method", "svd", "--ratio", "0.2", "--out", str(out), "--json", "-q",
                     "--save-dtype", "float32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ratio_achieved"] == pytest.approx(0.2, abs=0.01)
    record = json.loads((out / "config.json").read_text())["rankdown"]
    assert record["source"] == {"gguf_file": "tiny.gguf", "quantization": "F32"}

    model, _ = gguf_source.load(path)  # the same compression in memory
    rd.compress(model, None, make_config("svd", ratio=0.2), None)
    saved = rd.load(out)
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(saved(x).logits, model(x).logits)


def test_a_gguf_is_saved_in_bfloat16_by_default_and_the_summary_says_so(tiny_gguf, tmp_path, capsys):
    """The dequantized float32 would make the folder 4.4 times the Q4 file (94 MB -> 415 MB)."""
    from rankdown import cli
    from rankdown.allocate import count_params

    path, _ = tiny_gguf
    sizes = {}
    for save in ("auto", "float32"):
        out = tmp_path / save
        assert cli.main(["compress", str(path), "--method", "svd", "--ratio", "0.2", "--out", str(out), "--json", "-q",
                         "--save-dtype", save]) == 0
        printed = capsys.readouterr().out
        summary = json.loads(printed.strip().splitlines()[-1])
        sizes[save] = summary["bytes_on_disk"]
        assert sizes[save] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
        want = "bfloat16" if save == "auto" else "float32"
        assert summary["save_dtype"] == want and json.loads((out / "config.json").read_text())["dtype"] == want
        other = "float32" if save == "auto" else "bfloat16"
        assert f"on disk in {want} (--save-dtype {other} changes it)" in printed
        assert {p.dtype for p in rd_load(out).parameters()} == {getattr(torch, want)}
        assert count_params(rd_load(out)) == summary["params_after"]
    assert sizes["auto"] < 0.51 * sizes["float32"]


def rd_load(path):
    import rankdown as rd

    return rd.load(path)
