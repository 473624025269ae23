"""The command line as a user runs it: real subprocesses, exit codes, JSON, saved folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def rankdown(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rankdown.cli", *args], capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rankdown {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cli") / "svdllm"
    proc = rankdown("compress", "--method", "svd-llm", "--ratio", "0.2", "--calib", "reference", "--nsamples", "16",
                    "--seqlen", "128", "--seed", "3", "--out", str(out), "--json", "-q")
    return out, last_json(proc)


def test_compress_json_and_folder(compressed):
    out, res = compressed
    for key in ("method", "ratio_requested", "params_before", "params_after", "ratio_achieved", "seconds", "out"):
        assert key in res
    assert res["method"] == "svd-llm" and res["ratio_requested"] == 0.2
    assert abs(res["ratio_achieved"] - 0.2) <= 0.01
    assert abs(1 - res["params_after"] / res["params_before"] - res["ratio_achieved"]) < 1e-6
    cfg = json.loads((out / "config.json").read_text())
    rec = cfg["rankdown"]
    assert rec["method"] == "svd-llm" and rec["config"]["ratio"] == 0.2 and rec["seed"] == 3
    assert rec["calibration"]["source"] == "reference" and rec["calibration"]["nsamples"] == 16
    assert {"torch", "transformers", "rankdown"} <= set(rec["versions"])
    assert len(rec["structure"]["modules"]) == 6 * 7
    assert (out / "tokenizer.json").exists() and (out / "modeling_rankdown.py").exists()


def test_eval_ppl_of_saved_model_matches_api(compressed):
    out, _ = compressed
    res = last_json(rankdown("eval", str(out), "--ppl", "reference-heldout", "--seqlen", "128", "--max-windows", "20", "--json"))
    assert {"ppl", "tokens", "seconds"} <= set(res) and res["tokens"] == 20 * 127
    import rankdown as rd
    from rankdown.eval.perplexity import perplexity

    model = rd.load(out, dtype=torch.float32)  # `rankdown eval` computes in --dtype float32
    api = perplexity(model, rd.load_tokenizer(out), "reference-heldout", seqlen=128, max_windows=20)
    assert res["ppl"] == pytest.approx(api.ppl, rel=1e-6)


def test_saved_in_the_dtype_the_input_is_stored_in(compressed, tmp_path):
    """The reference model is stored in float16: so is its compressed copy, unless --save-dtype says."""
    import rankdown as rd

    out, _ = compressed
    assert {p.dtype for p in rd.load(out).parameters()} == {torch.float16}
    rankdown("compress", "--method", "svd", "--ratio", "0.2", "--save-dtype", "float32", "--out", str(tmp_path / "f"),
             "-q")
    assert {p.dtype for p in rd.load(tmp_path / "f").parameters()} == {torch.float32}


def test_a_closed_pipe_ends_quietly(compressed):
    """`rankdown inspect DIR | head`: the reader goes away before the table is written; the
    command ends with 128 + SIGPIPE and says nothing (it printed a traceback before)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "rankdown.cli", "inspect", str(compressed[0])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 128 + signal.SIGPIPE and "Traceback" not in err, err


def test_inspect_prints_ranks_and_provenance(compressed):
    out, _ = compressed
    text = rankdown("inspect", str(out)).stdout
    assert "model.layers.5.mlp.down_proj" in text and "lowrank" in text
    assert "svd-llm" in text and "calibration" in text and "transformers" in text


# a command-line run each; the slow ones are also refused in-process, fast, elsewhere (tests/test_contract.py,
# test_calib.py, test_perplexity.py, test_cli_input.py)
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "args, words",
    [
        (["compress", "--method", "nope", "--ratio", "0.2"], "invalid choice"),
        pytest.param(["compress", "--method", "svd", "--ratio", "1.5", "-q"], "between 0 and 1", marks=SLOW),
        (["compress", "--method", "svd-llm", "--ratio", "0.2", "--calib", "/no/such/file.txt", "-q"], "/no/such/file.txt"),
        pytest.param(["compress", "--method", "svd-llm", "--ratio", "0.2", "--calib", "wikitext2", "-q", "--dry-run"],
                     "--calib reference", marks=SLOW),
        (["compress", "/no/such/model_dir_xyz", "--method", "svd", "--ratio", "0.2", "-q", "--dry-run"], "no such model folder"),
        (["compress", "nobody/no-such-model-xyz", "--method", "svd", "--ratio", "0.2", "-q", "--dry-run"], "could not load"),
        pytest.param(["eval", "reference", "--ppl", "reference-heldout", "--seqlen", "100000000"], "lower --seqlen", marks=SLOW),
        (["inspect", "/no/such/dir"], "not a model folder"),
        (["compress", "--method", "svd-llm", "--ratio", "0.1", "--nsamples", "1", "--seqlen", "16", "-q", "--dry-run"],
         "fewer than the rank"),
        pytest.param(["compress", "--method", "svd", "--ratio", "0.2", "--out", f"{__file__}/out", "-q"], "cannot write", marks=SLOW),
    ],
)
def test_bad_input_gives_one_clear_error(args, words):
    proc = rankdown(*args, check=False)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from rankdown import cli
    from rankdown.io import writing

    def full(*a, **k):
        (a[2] / "model.safetensors").write_bytes(b"half")  # the save had begun
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writing, "_write", full)
    rc = cli.main(["compress", "--method", "svd", "--ratio", "0.2", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0]
    assert os.listdir(tmp_path) == []


def test_existing_output_folder_is_refused_and_kept(compressed, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = rankdown("compress", "--method", "svd", "--ratio", "0.2", "--out", str(out), "-q", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_compressing_a_compressed_folder_keeps_earlier_replacements(compressed, tmp_path):
    out, first = compressed  # svd-llm at 20%, every target replaced
    proc = rankdown("compress", str(out), "--method", "svd", "--ratio", "0.1", "-q", "--dry-run", check=False)
    assert proc.returncode == 2 and "already replaced" in proc.stderr
    # a model compressed with the MLP excluded can be compressed again on the MLP
    partial, again = tmp_path / "attn", tmp_path / "attn_mlp"
    rankdown("compress", "--method", "svd", "--ratio", "0.05", "--exclude", "mlp", "--out", str(partial), "-q")
    res = last_json(rankdown("compress", str(partial), "--method", "svd", "--ratio", "0.1", "--exclude", "self_attn",
                             "--out", str(again), "--json", "-q"))
    modules = json.loads((again / "config.json").read_text())["rankdown"]["structure"]["modules"]
    assert len(modules) == 6 * 7  # 4 attention linears from the first run, 3 MLP ones from the second
    import rankdown as rd
    from rankdown.allocate import count_params

    assert count_params(rd.load(again)) == res["params_after"]


def test_modegpt_keeps_more_channels_than_calibration_tokens():
    """MoDeGPT's MLP width is a choice of channels refitted with a ridge, not directions the data
    must span: a calibration set smaller than the kept width (here 128 tokens, widths of hundreds),
    refused for svd-llm above, is accepted, and the model is finite."""
    import rankdown as rd
    from rankdown import ModeGPTConfig
    from rankdown.reference import load_reference

    model, tok = load_reference(torch.float32)
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    report = rd.compress(model, tok, ModeGPTConfig(ratio=0.1), ids, progress=False)
    widths = [m["out"] for p, m in report.modules.items() if p.endswith("up_proj")]
    assert max(widths) > ids.numel() and abs(report.ratio_achieved - 0.1) <= 0.01
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow  # the whole held-out text per method; tests/test_cli_input.py checks demo's settings fast
def test_demo_compares_every_method_with_the_dense_model(capsys):
    """`rankdown demo` (the README's first command): every method at the asked ratio, each row's
    perplexity measured on the held-out text against the dense model's."""
    from rankdown import cli

    from rankdown.methods import METHODS

    assert cli.build_parser().parse_args(["demo"]).methods == ",".join(METHODS)  # all
    methods = "svd,modegpt"  # each evaluated on the whole held-out text: two keep the test short
    rc = cli.main(["demo", "--methods", methods, "--ratio", "0.2", "--nsamples", "16", "--seqlen", "128", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rc == 0 and [r["model"] for r in rows] == ["dense", *methods.split(",")]
    dense = rows[0]
    for r in rows[1:]:
        assert abs(r["removed"] - 0.2) <= 0.01 and r["params"] < dense["params"]
        assert dense["heldout_ppl"] < r["heldout_ppl"] < 1.5 * dense["heldout_ppl"]


def test_python_dash_m_rankdown_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "rankdown", "inspect", "--help"], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: rankdown inspect"), proc.stderr


def test_the_library_decides_streaming_as_the_command_line_does(tmp_path):
    from rankdown.config import ConfigError
    from rankdown.loading import should_stream
    from rankdown.reference import reference_dir

    folder = str(reference_dir())  # a local folder of safetensors weights
    assert should_stream(folder, tmp_path / "out", "svd")  # the default when saving
    assert not should_stream(folder, None, "svd")  # nothing to write shard by shard
    assert not should_stream(folder, tmp_path / "out", "svd", want=False)
    assert not should_stream("reference", tmp_path / "out", "svd")
    with pytest.raises(ConfigError, match="give --out FOLDER"):
        should_stream(folder, None, "svd", want=True)
    with pytest.raises(ConfigError, match="is not one"):
        should_stream("reference", tmp_path / "out", "svd", want=True)


def test_compress_model_saves_a_folder_that_reloads_at_the_reported_size(tmp_path):
    import rankdown
    from rankdown.pipeline import compress_model

    done = compress_model(None, tmp_path / "small", rankdown.SVDConfig(ratio=0.2), "reference", seqlen=128,
                          progress=False)
    assert done.out == tmp_path / "small" and not done.streamed
    small = rankdown.load(done.out)
    assert sum(p.numel() for p in small.parameters()) == done.report.params_after < done.report.params_before
