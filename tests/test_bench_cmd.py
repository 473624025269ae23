"""`rankdown bench`: a small grid on the reference model, its files, a failing cell, user errors."""

import json
import math
import subprocess
import sys

import pytest

from test_cli import ENV, last_json

from rankdown.benchmark import BenchSettings, parse_method, run_bench
from rankdown.config import ConfigError


def rankdown(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a subprocess on one thread (as conftest runs the tests): two threads on a busy
    machine can make the small models here many times slower."""
    proc = subprocess.run([sys.executable, "-m", "rankdown.cli", *args], capture_output=True, text=True,
                          env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rankdown {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


FAILING = "rom:allocation=last-k:last_k=1"  # one layer cannot give up 40% of the whole model


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "grid"
    proc = rankdown("bench", "--methods", f"svd,{FAILING}", "--ratios", "0.1,0.4", "--nsamples", "4", "--seqlen", "128",
                    "--max-windows", "4", "--degeneration-tokens", "12", "--speed", "--speed-prompt-len", "16",
                    "--speed-new-tokens", "4", "--repeats", "1", "--out", str(out), "--json")
    return out, last_json(proc), proc.stdout


def test_bench_files_and_rows(grid):
    out, res, stdout = grid
    assert sorted(p.name for p in out.iterdir()) == ["ppl_vs_ratio.png", "results.json", "results.md",
                                                     "speedup_vs_ratio.png"]
    for png in ("ppl_vs_ratio.png", "speedup_vs_ratio.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["methods"] == ["svd", FAILING] and saved["settings"]["ratios"] == [0.1, 0.4]
    assert {"torch", "transformers", "rankdown"} <= set(saved["versions"])
    assert [(c["method"], c["ratio"]) for c in saved["cells"]] == [
        ("svd", 0.1), ("svd", 0.4), (FAILING, 0.1), (FAILING, 0.4)]
    assert saved["calibration"]["nsamples"] == 4 and saved["dense"]["ppl_tokens"] == 4 * 127
    svd = {c["ratio"]: c for c in saved["cells"] if c["method"] == "svd"}
    for r, c in svd.items():
        assert "error" not in c and abs(c["ratio_achieved"] - r) < 0.01
        assert c["ppl"] > saved["dense"]["ppl"] and c["ppl_change"] == pytest.approx(c["ppl"] / saved["dense"]["ppl"] - 1)
        assert 0.0 <= c["repetition"] <= 1.0 and 0.0 < c["distinct_2"] <= 1.0
        assert [x["prompt"] for x in c["samples"]] == saved["settings"]["prompts"]  # the reference's code prompts
        sp = c["speed"]
        assert all(math.isfinite(sp[k]) and sp[k] > 0 for k in ("prefill_speedup", "decode_speedup", "latency_ratio"))
        assert sp["decode_speedup"] == pytest.approx(sp["compressed"]["decode_tok_s"] / sp["dense"]["decode_tok_s"])
        assert sp["model_bytes_ratio"] == pytest.approx(c["params"] / saved["dense"]["params"], rel=1e-3)
    assert svd[0.4]["ppl"] > svd[0.1]["ppl"]  # removing more costs more
    for c in svd.values():  # issue 32: the cost per stage, in dense forwards measured in the same run
        cost = c["cost"]
        assert cost["forward_seconds"] > 0 and "decompositions" in cost["stages"]
        assert cost["stages"]["total"]["forwards"] == pytest.approx(
            cost["stages"]["total"]["seconds"] / cost["forward_seconds"], rel=1e-2)
    md = (out / "results.md").read_text()
    assert md in stdout
    ppl_table = md.split("## Perplexity")[1].split("##")[0]
    assert "| method | 0.1 | 0.4 |" in ppl_table
    assert f"| svd | {svd[0.1]['ppl']:.3f} | {svd[0.4]['ppl']:.3f} |" in ppl_table
    assert "## Compression cost" in md
    assert res["dense"]["ppl"] == pytest.approx(saved["dense"]["ppl"])


def test_failing_cell_is_recorded(grid):
    out, _, _ = grid
    saved = json.loads((out / "results.json").read_text())
    failed = next(c for c in saved["cells"] if c["method"] == FAILING and c["ratio"] == 0.4)
    assert "ConfigError" in failed["error"] and "last 1 layers" in failed["error"] and "ppl" not in failed
    md = (out / "results.md").read_text()
    row = next(line for line in md.split("## Perplexity")[1].splitlines() if line.startswith(f"| {FAILING} |"))
    assert row.rstrip().endswith("| error |")
    assert f"- {FAILING} at 0.4: ConfigError" in md


def test_parse_method():
    assert parse_method("rom:allocation=uniform:center=false:last_k=2") == (
        "rom", {"allocation": "uniform", "center": False, "last_k": 2})
    assert parse_method("svd") == ("svd", {})
    with pytest.raises(ConfigError, match="key=value"):
        parse_method("rom:uniform")


def test_user_errors_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'nosuch'.*svd"):
        run_bench(BenchSettings(methods=["svd", "nosuch"], ratios=[0.2]), tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown rom setting"):
        run_bench(BenchSettings(methods=["rom:colour=red"], ratios=[0.2]), tmp_path / "b")
    with pytest.raises(ConfigError, match="ratio 1.5 is out of range"):
        run_bench(BenchSettings(methods=["svd"], ratios=[1.5]), tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing written
    proc = rankdown("bench", "--methods", "svd,nosuch", "--out", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "unknown method 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr


def test_default_methods_are_the_registry():
    from rankdown.methods import METHODS

    assert BenchSettings().resolve().methods == list(METHODS)


def test_interrupted_grid_resumes(tmp_path, monkeypatch):
    """results.json is written after every cell; the same settings carry the grid on from there, other
    settings are refused, --overwrite starts over."""
    from rankdown.benchmark import grid as bench

    out = tmp_path / "grid"
    settings = BenchSettings(methods=["svd"], ratios=[0.1, 0.3], nsamples=2, seqlen=64, max_windows=2,
                             degeneration_tokens=0)
    real_cell, calls = bench._cell, []

    def cell_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real_cell(*args, **kwargs)

    monkeypatch.setattr(bench, "_cell", cell_then_stop)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_bench(settings, out, progress=False)
    assert "1 finished cells are kept" in stopped.value.__notes__[0] and "same command" in stopped.value.__notes__[0]
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and [c["ratio"] for c in partial["cells"]] == [0.1]
    assert "Unfinished" in (out / "results.md").read_text()

    with pytest.raises(FileExistsError, match="other settings.*seqlen"):
        run_bench(BenchSettings(methods=["svd"], ratios=[0.1, 0.3], nsamples=2, seqlen=32, max_windows=2,
                                degeneration_tokens=0), out, progress=False)

    seen = []
    monkeypatch.setattr(bench, "_cell", lambda *a, **k: seen.append(a[3]) or real_cell(*a, **k))
    res = run_bench(settings, out, progress=False)
    assert seen == [0.3]  # only the missing cell is compressed again
    assert res["complete"] is True and [c["ratio"] for c in res["cells"]] == [0.1, 0.3]
    assert res["cells"][0] == partial["cells"][0] and res["dense"] == partial["dense"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is True and "Unfinished" not in (out / "results.md").read_text()
    with pytest.raises(FileExistsError, match="already holds results.json"):
        run_bench(settings, out, progress=False)
    seen.clear()
    run_bench(settings, out, overwrite=True, progress=False)
    assert seen == [0.1, 0.3]
