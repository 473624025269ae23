"""Nothing lost, nothing half-true: --out never eats the input, resumes never mix two runs, failures
do not loop, two runs do not share a folder, killed runs leave nothing behind, provenance is whole."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankdown
from rankdown import cli, io
from rankdown.storage.folder import StreamedModel
from rankdown.storage.resume import ResumableStore, ResumeMismatchError
from rankdown.stream import compress_folder, partial_folder
from tests.test_cli import ENV
from tests.tiny import outputs, tiny_ids, tiny_model

IDS = tiny_ids(8, 32)
SVD = ["--method", "svd", "--ratio", "0.3", "-q"]


def _folder(tmp_path: Path, name: str = "src", tokenizer: bool = False) -> Path:
    path = tmp_path / name
    tiny_model("llama").save_pretrained(path)
    if tokenizer:  # a word-level tokenizer whose ids fit the tiny vocabulary
        import transformers as tf
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        words = " ".join(f"w{i}" for i in range(60))
        tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
        tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _interrupt_after_layer_0(monkeypatch) -> None:
    """Ctrl-C once layer 0 is written (as a kill would)."""
    real = ResumableStore.commit

    def commit(self, i, layer, records):
        real(self, i, layer, records)
        if records is not None and i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumableStore, "commit", commit)


# ----------------------------------------------------------------------------- 1. --out and the input
def test_out_that_is_holds_or_is_inside_the_input_is_refused(tmp_path, capsys):
    src = _folder(tmp_path / "P", "model")
    (tmp_path / "P" / "notes.txt").write_text("mine")
    before = _contents(tmp_path)
    capsys.readouterr()
    for out, words in ((src, "is the input model"), (src.parent, "holds the input model"),
                       (src / "small", "is inside the input model folder")):
        for stream_flag in ("--stream", "--no-stream"):
            rc = cli.main(["compress", str(src), *SVD, "--out", str(out), "--overwrite", stream_flag])
            err = _err(capsys)
            assert rc == 2 and len(err) == 1 and words in err[0] and "choose an --out outside" in err[0], err
    config = rankdown.make_config("svd", ratio=0.3)
    with pytest.raises(io.OutputExistsError, match="is the input model"):
        compress_folder(src, src, config, None, overwrite=True, progress=False)
    with pytest.raises(io.OutputExistsError, match="holds the input model"):  # the folder it was loaded from
        io.save(io.load(src), None, src.parent, {}, {"modules": {}}, overwrite=True)
    assert _contents(tmp_path) == before


def test_overwrite_replaces_only_a_folder_rankdown_saved(tmp_path, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["compress", str(src), *SVD, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep").mkdir()
    before = _contents(tmp_path)
    for taken, words in ((out, "holds notes.txt, which rankdown did not write"),
                         (tmp_path / "results", "holds r.json"), (tmp_path / "sub", "holds deep/")):
        rc = cli.main(["compress", str(src), *SVD, "--out", str(taken), "--overwrite"])
        err = _err(capsys)
        assert rc == 2 and len(err) == 1 and words in err[0] and "only a model folder that rankdown saved" in err[0]
    assert _contents(tmp_path) == before
    (out / "notes.txt").unlink()
    cfg = json.loads((out / "config.json").read_text())
    del cfg["rankdown"]["files"]  # as an older rankdown saved it: which files are its own is not known
    (out / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["compress", str(src), *SVD, "--out", str(out), "--overwrite"]) == 2
    assert "saved by an older rankdown" in _err(capsys)[0] and (out / "config.json").read_text() == json.dumps(cfg)
    cfg["rankdown"]["files"] = sorted(os.listdir(out))
    (out / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["compress", str(src), "--method", "svd", "--ratio", "0.2", "--out", str(out), "--overwrite",
                     "-q"]) == 0
    assert io.read_record(out)["config"]["ratio"] == 0.2
    assert sorted(os.listdir(tmp_path)) == ["out", "results", "src", "sub"]


# ----------------------------------------------------------------------------- 2. a resume never mixes two runs
@pytest.mark.parametrize("change", ["calibration", "weights"])
def test_resume_refuses_changed_inputs(tmp_path, monkeypatch, change):
    src = _folder(tmp_path, tokenizer=True)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 60}" for i in range(400)))
    out = tmp_path / "out"
    config = rankdown.make_config("svd-llm", ratio=0.3)
    run = lambda **kw: compress_folder(src, out, config, str(calib), run=rankdown.RunSettings(batch_size=4), nsamples=8,
                                       seqlen=32, progress=False, **kw)
    with monkeypatch.context() as m:
        _interrupt_after_layer_0(m)
        with pytest.raises(KeyboardInterrupt):
            run()
    state = partial_folder(out) / "state.json"
    assert list(json.loads(state.read_text())["layers"]) == ["0"]
    if change == "calibration":  # same path, same size, other words
        calib.write_text(" ".join(f"w{(i * 11) % 60}" for i in range(400)))
    else:  # same size, same date, one weight changed
        _change_one_weight_keeping_size_and_date(src / "model.safetensors")
    what = {"calibration": "the calibration changed", "weights": "the model's weights changed"}[change]
    with pytest.raises(ResumeMismatchError, match=re.escape(what) + ".*--restart"):
        run()
    assert list(json.loads(state.read_text())["layers"]) == ["0"]  # the partial run is left alone
    run(resume=False)  # --restart
    whole = tmp_path / "whole"
    compress_folder(src, whole, config, str(calib), nsamples=8, seqlen=32, progress=False)
    assert torch.equal(outputs(io.load(out), IDS), outputs(io.load(whole), IDS))


# ----------------------------------------------------------------------------- 3. failures that do not loop
def test_a_weight_of_the_wrong_shape_is_refused_before_any_work(tmp_path, capsys):
    src = _folder(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(64, 60)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    rc = cli.main(["compress", str(src), *SVD, "--out", str(tmp_path / "out")])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1, err
    assert "model.layers.1.self_attn.q_proj.weight in model.safetensors has shape (64, 60)" in err[0]
    assert "(64, 64)" in err[0] and "resume" not in err[0]
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no partial run to loop on


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_a_damaged_finished_layer_is_computed_again(tmp_path, monkeypatch, caplog, damage):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    config = rankdown.make_config("svd-llm", ratio=0.3)
    four = rankdown.RunSettings(batch_size=4)
    with monkeypatch.context() as m:
        _interrupt_after_layer_0(m)
        with pytest.raises(KeyboardInterrupt) as info:
            compress_folder(src, out, config, IDS, run=four, progress=False)
    notes = getattr(info.value, "__notes__", [])
    shard = partial_folder(out) / "layer-00000.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(data[:50])
    else:  # same size, one byte of a weight changed
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rankdown.storage.resume"):
        compress_folder(src, out, config, IDS, run=four, progress=False)
    assert "layer-00000.safetensors of the partial run is damaged" in caplog.text
    compress_folder(src, tmp_path / "whole", config, IDS, progress=False)
    assert torch.equal(outputs(io.load(out), IDS), outputs(io.load(tmp_path / "whole"), IDS))
    assert sorted(os.listdir(tmp_path)) == ["out", "src", "whole"]
    assert len(notes) == 1 and "--restart" in notes[0]  # what the CLI prints after "interrupted"


# ----------------------------------------------------------------------------- 4. two runs, one --out
def test_a_second_run_into_the_same_out_is_refused_at_once(tmp_path, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    work = partial_folder(out)
    work.mkdir()
    lock = os.open(work / "lock", os.O_RDWR | os.O_CREAT)  # a run that is writing to out (here: this process)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock, f"{os.getpid()}\n".encode())
    try:
        (work / "state.json").write_text('{"fingerprint": {}, "layers": {"0": {}}}')
        before = _contents(work)
        for extra in ([], ["--restart"]):
            rc = cli.main(["compress", str(src), *SVD, "--out", str(out), *extra])
            err = _err(capsys)
            assert rc == 2 and err == [f"rankdown compress: error: another rankdown run is writing to {out} "
                                       f"(pid {os.getpid()}): wait for it to end, or choose another --out"]
        assert _contents(work) == before and not out.exists()
    finally:
        os.close(lock)
    assert cli.main(["compress", str(src), *SVD, "--out", str(out), "--restart"]) == 0  # once it has ended
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# ----------------------------------------------------------------------------- 5. leftovers and signals
def test_leftovers_of_killed_saves_are_removed_by_the_next_run(tmp_path, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    cmd = ["compress", str(src), *SVD, "--out", str(out), "--overwrite"]
    assert cli.main(cmd) == 0
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        for name in (f".out.tmp-{gone.pid}", f".out.old-{gone.pid}", f".out.tmp-{alive.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
        assert cli.main(cmd) == 0
        assert sorted(os.listdir(tmp_path)) == [f".out.tmp-{alive.pid}", "out", "src"]  # a live run's is its own
    finally:
        alive.kill()
        alive.wait()
    # killed between its two renames: the old folder aside, none in place; it is put back, then replaced
    os.replace(out, tmp_path / f".out.old-{gone.pid}")
    (tmp_path / f".out.tmp-{gone.pid}").mkdir()
    assert cli.main(cmd) == 0
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # the process that left .tmp-{alive.pid} has ended too


KILLER = r"""
import os, signal, sys
from rankdown import cli
from rankdown.io import writing as io
from rankdown.storage.resume import ResumableStore
when, sig = sys.argv[1], getattr(signal, sys.argv[2])
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (a background job ignores SIGINT)
if when == "layer":
    real = ResumableStore.commit
    def commit(self, i, layer, records):
        real(self, i, layer, records)
        if records is not None and i == 0:
            os.kill(os.getpid(), sig)
    ResumableStore.commit = commit
else:
    real_write = io._write
    def write(model, tokenizer, tmp, *a, **k):
        real_write(model, tokenizer, tmp, *a, **k)
        os.kill(os.getpid(), sig)  # the new folder is half written
    io._write = write
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when,sig,rc,words", [
    ("layer", "SIGINT", 130, "rankdown compress: interrupted; the partial run in {work} is kept (finished layers: 1)"),
    ("save", "SIGTERM", 143, "rankdown compress: terminated (SIGTERM); the partial run in {work} is kept "
                             "(finished layers: 2)"),
])
def test_ctrl_c_and_sigterm_print_one_line_and_leave_a_run_to_resume(tmp_path, capsys, when, sig, rc, words):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    args = ["compress", str(src), *SVD, "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", KILLER, when, sig, *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == rc and len(err) == 1, proc.stderr
    assert err[0] == words.format(work=partial_folder(out)) + (": run the same command again to resume, or add "
                                                               "--restart to start over")
    assert sorted(os.listdir(tmp_path)) == [partial_folder(out).name, "src"]  # no half-written folder
    assert cli.main(args) == 0
    assert "resuming: " in capsys.readouterr().out and sorted(os.listdir(tmp_path)) == ["out", "src"]


# ----------------------------------------------------------------------------- 9. provenance and file modes
def test_every_compression_pass_is_recorded_in_order(tmp_path):
    first, second = (rankdown.make_config("svd", ratio=0.05, exclude=["mlp"]),
                     rankdown.make_config("svd", ratio=0.1, exclude=["self_attn"]))
    model = tiny_model("llama")
    rankdown.save(model, None, tmp_path / "a", rankdown.compress(model, None, first, progress=False))
    compress_folder(tmp_path / "a", tmp_path / "streamed", second, None, progress=False)
    again = io.load(tmp_path / "a")
    rankdown.save(again, None, tmp_path / "memory", rankdown.compress(again, None, second, progress=False))
    for folder in ("streamed", "memory"):
        rec = io.read_record(tmp_path / folder)
        passes = rec["passes"]
        assert [(p["method"], p["config"]["ratio"], p["config"]["exclude"]) for p in passes] == [
            ("svd", 0.05, ["mlp"]), ("svd", 0.1, ["self_attn"])]
        assert passes[0]["params_after"] == passes[1]["params_before"]
        assert passes[1]["params_after"] == rec["params_after"]
        assert all("calibration" in p and "versions" in p for p in passes)
        assert {k: rec[k] for k in passes[1]} == passes[1]  # the top level is still the last pass


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_all_get_the_mode_of_a_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        model = tiny_model("llama")
        rankdown.save(model, None, tmp_path / "memory", rankdown.compress(model, None, rankdown.make_config(
            "svd", ratio=0.3), progress=False))
        compress_folder(_folder(tmp_path), tmp_path / "streamed", rankdown.make_config("svd", ratio=0.3), None,
                        progress=False)
    finally:
        os.umask(old)
    for folder in ("memory", "streamed"):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / folder).iterdir()}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_the_statistics_cache_key_follows_the_weights_content(tmp_path):
    """The --stats-cache key is the content digest: a same-size, same-date weight change gives another key
    (it used to be names, sizes and dates), and the digest is read once a process for unchanged files."""
    src = _folder(tmp_path)
    key = lambda: StreamedModel(src).digest()
    before = key()
    assert key() == before
    _change_one_weight_keeping_size_and_date(src / "model.safetensors")
    assert key() != before


def _change_one_weight_keeping_size_and_date(file):
    st = file.stat()
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1
    save_file(tensors, file, metadata={"format": "pt"})
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file.stat().st_size == st.st_size and file.stat().st_mtime_ns == st.st_mtime_ns
