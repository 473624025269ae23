"""Bad input to the command line: one clear error line (what is wrong, what to do), exit status 2,
no traceback, and the check made before any expensive work. Run in-process (``cli.main``): an
exception that escapes it is the traceback a user would see, and fails the test."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankdown import cli
from rankdown.reference import reference_dir

NAN_TENSOR = "model.layers.4.mlp.down_proj.weight"
BARS_OFF = bool(os.environ.get("TQDM_DISABLE"))


def _copy(root: Path, name: str) -> Path:
    return Path(shutil.copytree(reference_dir(), root / name))


def _edit_config(folder: Path, change) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the reference model, one per way a download or an edit can go wrong."""
    root = tmp_path_factory.mktemp("broken")
    f: dict[str, Path] = {}
    f["a_file"] = root / "a_file"
    f["a_file"].write_text("notes the user keeps\n")
    f["noweights"] = _copy(root, "noweights")
    (f["noweights"] / "model.safetensors").unlink()
    f["truncated"] = _copy(root, "truncated")
    data = (f["truncated"] / "model.safetensors").read_bytes()
    (f["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    _edit_config(f["truncated"], lambda c: c.pop("dtype"))  # so --save-dtype auto reads the weights' own
    tensors = load_file(reference_dir() / "model.safetensors")
    keys = sorted(tensors)
    for name in ("sharded_truncated", "sharded_missing"):
        d = f[name] = _copy(root, name)
        (d / "model.safetensors").unlink()
        shards = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
        for shard in sorted(set(shards.values())):
            save_file({k: tensors[k] for k in keys if shards[k] == shard}, d / shard, metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    last = f["sharded_truncated"] / "model-00002-of-00002.safetensors"
    last.write_bytes(last.read_bytes()[:-100])
    (f["sharded_missing"] / "model-00002-of-00002.safetensors").unlink()
    f["nan"] = _copy(root, "nan")
    bad = dict(tensors)
    bad[NAN_TENSOR] = bad[NAN_TENSOR].clone()
    bad[NAN_TENSOR][3, 5] = float("nan")
    save_file(bad, f["nan"] / "model.safetensors", metadata={"format": "pt"})
    f["missing_tensor"] = _copy(root, "missing_tensor")
    save_file({k: t for k, t in tensors.items() if k != "model.layers.2.self_attn.k_proj.weight"},
              f["missing_tensor"] / "model.safetensors", metadata={"format": "pt"})
    f["no_tokenizer"] = _copy(root, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (f["no_tokenizer"] / name).unlink()
    f["not_utf8"] = _copy(root, "not_utf8")  # a config.json saved by an editor in Latin-1
    (f["not_utf8"] / "config.json").write_bytes((f["not_utf8"] / "config.json").read_bytes()[:-1]
                                                + b', "_name_or_path": "mod\xe8le"}')
    f["value_type"] = _copy(root, "value_type")
    _edit_config(f["value_type"], lambda c: c.update(hidden_size="abc"))
    f["unknown_type"] = _copy(root, "unknown_type")
    _edit_config(f["unknown_type"], lambda c: c.update(model_type="frobnicator"))
    # a rankdown folder (svd at 20%: seconds) and three damaged copies of its record
    f["svd"] = root / "svd"
    assert cli.main(["compress", "--method", "svd", "--ratio", "0.2", "--out", str(f["svd"]), "-q"]) == 0
    first = lambda c: next(iter(c["rankdown"]["structure"]["modules"].values()))  # noqa: E731
    for name, change in (("record_list", lambda c: c.update(rankdown=[1, 2])),
                         ("module_type", lambda c: first(c).update(type="wavelet")),
                         ("modules_null", lambda c: c["rankdown"]["structure"].update(modules=None))):
        f[name] = Path(shutil.copytree(f["svd"], root / name))
        _edit_config(f[name], change)
    return f


def _run(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


SVD = ["--method", "svd", "--ratio", "0.2", "-q"]
PPL = ["--ppl", "reference-heldout", "--max-windows", "1"]

CASES = {
    # item 6: tracebacks before
    "no weights, compress": (lambda f, t: ["compress", str(f["noweights"]), *SVD, "--out", str(t / "o")],
                             ["has a config.json but no weights", "fetch the model again"]),
    "no weights, eval": (lambda f, t: ["eval", str(f["noweights"]), *PPL], ["has a config.json but no weights"]),
    "truncated file, compress": (lambda f, t: ["compress", str(f["truncated"]), *SVD, "--out", str(t / "o")],
                                 ["model.safetensors is not a readable safetensors file", "fetch the model again"]),
    "truncated file, compress in memory": (
        lambda f, t: ["compress", str(f["truncated"]), *SVD, "--no-stream", "--out", str(t / "o")],
        ["model.safetensors is not a readable safetensors file"]),
    "truncated file, eval": (lambda f, t: ["eval", str(f["truncated"]), *PPL],
                             ["model.safetensors is not a readable safetensors file", "fetch the model again"]),
    "truncated shard, eval": (lambda f, t: ["eval", str(f["sharded_truncated"]), *PPL],
                              ["model-00002-of-00002.safetensors is not a readable", "fetch the model again"]),
    "nan weights, in memory": (lambda f, t: ["compress", str(f["nan"]), *SVD, "--no-stream", "--out", str(t / "o")],
                               [f"{NAN_TENSOR} holds NaN or Inf"]),
    "device gpu0": (lambda f, t: ["compress", *SVD, "--device", "gpu0"], ["--device 'gpu0' is not a device", "cuda:N"]),
    "device banana": (lambda f, t: ["eval", "reference", *PPL, "--device", "banana"], ["'banana' is not a device"]),
    "device meta, compress": (lambda f, t: ["compress", *SVD, "--device", "meta"], ["--device meta cannot run"]),
    "device meta, eval": (lambda f, t: ["eval", "reference", *PPL, "--device", "meta"], ["--device meta cannot run"]),
    "device meta, bench": (lambda f, t: ["bench", "--methods", "svd", "--out", str(t / "b"), "--device", "meta", "-q"],
                           ["--device meta cannot run"]),
    "exclude not a regex": (lambda f, t: ["compress", *SVD, "--exclude", "[unclosed"],
                            ["--exclude '[unclosed' is not a valid regular expression", "backslash"]),
    "record not an object, eval": (lambda f, t: ["eval", str(f["record_list"]), *PPL],
                                   ['"rankdown" section is a JSON list, not an object']),
    "record not an object, inspect": (lambda f, t: ["inspect", str(f["record_list"])],
                                      ['"rankdown" section is a JSON list, not an object']),
    "unknown module type, eval": (lambda f, t: ["eval", str(f["module_type"]), *PPL],
                                  ['is of type "wavelet", which this rankdown', "it knows lowrank"]),
    "unknown module type, inspect": (lambda f, t: ["inspect", str(f["module_type"])],
                                     ['is of type "wavelet", which this rankdown']),
    "modules null, eval": (lambda f, t: ["eval", str(f["modules_null"]), *PPL],
                           ["rankdown.structure.modules is null, not an object"]),
    "modules null, inspect": (lambda f, t: ["inspect", str(f["modules_null"])],
                              ["rankdown.structure.modules is null, not an object"]),
    "nsamples beyond memory": (lambda f, t: ["compress", "--method", "svd-llm", "--ratio", "0.2", "-q",
                                             "--nsamples", "1000000000000"], ["GiB of memory", "lower --nsamples"]),
    "unknown model_type, compress": (lambda f, t: ["compress", str(f["unknown_type"]), *SVD, "--out", str(t / "o")],
                                     ["model_type 'frobnicator'", "rankdown supports: bert, gemma2, gemma3_text"]),
    "unknown model_type, eval": (lambda f, t: ["eval", str(f["unknown_type"]), *PPL],
                                 ["model_type 'frobnicator'", "rankdown supports: bert, gemma2, gemma3_text"]),
    # issue 30: a UnicodeDecodeError traceback, a 45-line validation traceback (inspect: exit 0) before
    **{f"config not UTF-8, {cmd}": (
        (lambda cmd: lambda f, t: [cmd, str(f["not_utf8"]), *{"eval": PPL, "inspect": [],
                                   "compress": [*SVD, "--out", str(t / "o")]}[cmd]])(cmd),
        ["config.json is not UTF-8 text (byte 0xe8", "fetch the model again"]) for cmd in ("eval", "compress", "inspect")},
    **{f"config value of the wrong type, {cmd}": (
        (lambda cmd: lambda f, t: [cmd, str(f["value_type"]), *{"eval": PPL, "inspect": [],
                                   "compress": [*SVD, "--out", str(t / "o")]}[cmd]])(cmd),
        ["config.json holds a value transformers refuses", "'hidden_size' expected int, got str", "fix that value"])
       for cmd in ("eval", "compress", "inspect")},
    # item 7: silently accepted before
    "seqlen 0, compress": (lambda f, t: ["compress", "--method", "svd-llm", "--ratio", "0.2", "-q", "--seqlen", "0"],
                           ["--seqlen must be >= 2", "got 0"]),
    "seqlen 0, eval": (lambda f, t: ["eval", "reference", *PPL, "--seqlen", "0"], ["--seqlen must be >= 2"]),
    "seqlen 0, bench": (lambda f, t: ["bench", "--methods", "svd", "--seqlen", "0", "--out", str(t / "b"), "-q"],
                        ["--seqlen must be >= 2"]),
    "exclude matches nothing": (lambda f, t: ["compress", *SVD, "--exclude", "no_such_module", "--dry-run"],
                                ["--exclude 'no_such_module' matches no module", "model.layers.0.self_attn.q_proj"]),
    "methods empty, bench": (lambda f, t: ["bench", "--methods", "", "--out", str(t / "b"), "-q"],
                             ["--methods '' names nothing"]),
    "methods empty, demo": (lambda f, t: ["demo", "--methods", " , "], ["--methods ' , ' names nothing"]),
    "tasks empty, bench": (lambda f, t: ["bench", "--methods", "svd", "--tasks", "", "--out", str(t / "b"), "-q"],
                           ["--tasks '' names nothing"]),
    "seqlen above max positions, compress": (
        lambda f, t: ["compress", "--method", "svd-llm", "--ratio", "0.2", "-q", "--nsamples", "1", "--seqlen", "4096"],
        ["--seqlen 4096 exceeds the model's max_position_embeddings (2048)"]),
    "seqlen above max positions, eval": (lambda f, t: ["eval", "reference", *PPL, "--seqlen", "4096"],
                                         ["--seqlen 4096 exceeds the model's max_position_embeddings (2048)"]),
    "out empty, compress": (lambda f, t: ["compress", *SVD, "--out", ""], ["--out '' names no folder"]),
    "out empty, bench": (lambda f, t: ["bench", "--methods", "svd", "--out", "", "-q"], ["--out '' names no folder"]),
    "calib file missing, svd": (lambda f, t: ["compress", *SVD, "--calib", str(t / "no_such.txt")],
                                ["no_such.txt does not exist", "svd uses no calibration"]),
    # item 8: late or wrong advice before
    "missing tensor, streamed": (
        lambda f, t: ["compress", str(f["missing_tensor"]), *SVD, "--out", str(t / "o")],
        ["is incomplete: model.layers.2.self_attn.k_proj.weight is in none of its weight files", "fetch the model"]),
    "missing tensor, in memory": (
        lambda f, t: ["compress", str(f["missing_tensor"]), *SVD, "--no-stream", "--out", str(t / "o")],
        ["missing keys: model.layers.2.self_attn.k_proj.weight", "the checkpoint is incomplete"]),
    "missing shard, eval": (lambda f, t: ["eval", str(f["sharded_missing"]), *PPL],
                            ["model-00002-of-00002.safetensors is listed in", "fetch the model again"]),
    "missing tokenizer, eval": (lambda f, t: ["eval", str(f["no_tokenizer"]), *PPL],
                                ["has no tokenizer files", "copy the tokenizer files"]),
    "out is a file": (lambda f, t: ["compress", *SVD, "--out", str(f["a_file"])],
                      ["a_file exists and is a file, not a folder; choose another --out"]),
    "out inside a file": (lambda f, t: ["compress", *SVD, "--out", f"{f['a_file']}/out"],
                          ["a_file is a file, not a folder; choose another --out"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, folders, tmp_path, capsys):
    make_args, words = CASES[case]
    rc, err = _run(make_args(folders, tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.startswith("rankdown ")]
    assert rc == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    if case.startswith("missing tensor"):
        assert "--no-stream" not in lines[0]  # that advice failed too
    if case.startswith("out i"):
        assert "free some space" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_read_only_stats_cache_is_refused_first_naming_the_flag(tmp_path, monkeypatch, capsys):
    """(As root a mode of 555 does not stop a write: the refusal of the OS is simulated.)"""
    cache = tmp_path / "cache"
    cache.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == cache else real(p, mode, **k))
    rc, err = _run(["compress", "--method", "rom", "--allocation", "global", "--ratio", "0.2", "-q", "--nsamples", "2",
                    "--seqlen", "64", "--stats-cache", str(cache), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"--stats-cache {cache} cannot be written" in err and "drop --stats-cache" in err
    assert "--out" not in err and sorted(os.listdir(tmp_path)) == ["cache"]


def _disk_fails(monkeypatch, message: str) -> None:
    """Every safetensors write fails as a real full (or read-only) disk makes it fail: with a
    SafetensorError, not an OSError (seen on a 64 KB tmpfs)."""
    import safetensors.torch

    def fail(*a, **k):
        raise SafetensorError(f"Error while serializing: I/O error: {message}")

    monkeypatch.setattr(safetensors.torch, "serialize_file", fail)


def test_a_stats_cache_that_fails_mid_run_names_the_flag(tmp_path, monkeypatch, capsys):
    _disk_fails(monkeypatch, "Read-only file system (os error 30)")
    rc, err = _run(["compress", "--method", "rom", "--allocation", "global", "--ratio", "0.2", "-q", "--nsamples", "2",
                    "--seqlen", "64", "--stats-cache", str(tmp_path / "cache"), "--dry-run"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("rankdown ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"--stats-cache {tmp_path / 'cache'}: cannot write there (Read-only file system)" in lines[0]
    assert "--out" not in lines[0] and list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("stream", [True, False])
def test_a_full_disk_is_one_line_streamed_or_not_and_leaves_nothing(tmp_path, monkeypatch, capsys, stream):
    src = Path(shutil.copytree(reference_dir(), tmp_path / "model"))
    _disk_fails(monkeypatch, "No space left on device (os error 28)")
    how = "--stream" if stream else "--no-stream"
    rc, err = _run(["compress", str(src), *SVD, "--out", str(tmp_path / "out"), how], capsys)
    lines = [line for line in err.splitlines() if line.startswith("rankdown ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"cannot write {tmp_path / 'out'}: No space left on device; free some space" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_nan_weights_are_found_before_any_layer_is_compressed(folders, tmp_path, monkeypatch, capsys):
    """Streamed, the bad tensor is in layer 4 of 6: every tensor is read and checked first."""
    from rankdown import api

    def compressing(*a, **k):
        raise AssertionError("a layer was compressed before the weights were checked")

    monkeypatch.setattr(api, "run_sequential", compressing)
    rc, err = _run(["compress", str(folders["nan"]), *SVD, "--stream", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"{NAN_TENSOR} in model.safetensors holds NaN or Inf" in err
    assert os.listdir(tmp_path) == []


def test_demo_checks_its_settings_before_evaluating(monkeypatch, capsys):
    import sys

    import rankdown.eval.perplexity  # noqa: F401  (the package's name `perplexity` is the function)

    def evaluating(*a, **k):
        raise AssertionError("the dense model was evaluated before the settings were checked")

    monkeypatch.setattr(sys.modules["rankdown.eval.perplexity"], "perplexity", evaluating)
    for args, words in ((["--ratio", "2"], "between 0 and 1"), (["--nsamples", "0"], "--nsamples must be >= 1"),
                        (["--seqlen", "4096"], "max_position_embeddings (2048)")):
        rc, err = _run(["demo", "--methods", "svd,rom", *args], capsys)
        assert rc == 2 and words in err, err


def test_a_calibration_file_for_a_method_that_reads_none_is_checked_and_said(tmp_path, caplog, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    with caplog.at_level(logging.WARNING):
        rc, _ = _run(["compress", *SVD, "--calib", str(text), "--dry-run"], capsys)
    assert rc == 0 and f"svd uses no calibration data: --calib {text} is not read" in caplog.text


def test_a_degenerate_calibration_text_is_warned_about(tmp_path, caplog):
    from rankdown.calib import calibration_data
    from rankdown.reference import load_reference

    _, tok = load_reference()
    nul = tmp_path / "nul.txt"
    nul.write_text("\0" * 4000)
    with caplog.at_level(logging.WARNING):
        data = calibration_data(tok, str(nul), nsamples=2, seqlen=64)
    assert data.nsamples == 2 and "is degenerate" in caplog.text and "1 distinct" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibration_data(tok, "reference", nsamples=2, seqlen=64)
    assert "degenerate" not in caplog.text


@pytest.mark.skipif(BARS_OFF, reason="TQDM_DISABLE is set for this run (tqdm reads it once, at import)")
def test_eval_shows_progress_unless_quiet(capsys):
    args = ["eval", "reference", "--ppl", "reference-heldout", "--seqlen", "64", "--max-windows", "3"]
    rc, err = _run(args, capsys)
    assert rc == 0 and "perplexity:" in err and "/3 [" in err
    rc, err = _run(args + ["-q"], capsys)
    assert rc == 0 and "perplexity" not in err


def test_tqdm_disable_silences_the_bars():
    import subprocess
    import sys

    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rankdown.cli", "eval", "reference", "--ppl", "reference-heldout",
                           "--seqlen", "64", "--max-windows", "3"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "ppl" in proc.stdout and "perplexity" not in proc.stderr, proc.stderr


@pytest.mark.skipif(BARS_OFF, reason="TQDM_DISABLE is set for this run (tqdm reads it once, at import)")
def test_bench_shows_progress_while_it_evaluates_the_dense_model(capsys):
    from rankdown.benchmark.grid import BenchSettings, _evaluate
    from rankdown.reference import load_reference

    model, tok = load_reference(torch.float32)
    s = BenchSettings(max_windows=2, degeneration_tokens=4, seqlen=64).resolve()
    capsys.readouterr()
    row = _evaluate(model, tok, s, None, progress=True)
    err = capsys.readouterr().err
    assert row["ppl_tokens"] == 2 * 63 and "perplexity" in err and "generation check" in err and "/1 [" in err
