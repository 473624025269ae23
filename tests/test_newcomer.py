"""What a newcomer hit (issue 30): the default command, --dry-run, the saved dtype of a GGUF input,
damaged config.json values, inspect's table, a resumed run's seconds, an interrupt before the first
layer, --help, and the README's offline snippet. Each test fails on the code before the issue."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from rankdown import cli
from rankdown.methods.base import Method
from rankdown.reference import reference_dir
from rankdown.storage.resume import ResumableStore
from rankdown.stream import partial_folder
from tests.test_nothing_lost import SVD, _folder


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(args)
    got = capsys.readouterr()
    return rc, got.out, got.err


def _one_error(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rankdown "), err
    return lines[0]


# ----------------------------------------------------------------------------- resume and interrupts
def test_a_resumed_run_reports_its_own_seconds_and_the_total(tmp_path, capsys, monkeypatch):
    src, out = _folder(tmp_path), tmp_path / "out"
    real = ResumableStore.commit

    def commit(self, i, layer, records):
        real(self, i, layer, records)
        if records is not None and i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumableStore, "commit", commit)
    rc, _, err = _run(["compress", str(src), *SVD, "--out", str(out)], capsys)
    assert rc == 130 and "finished layers: 1" in err
    earlier = json.loads((partial_folder(out) / "state.json").read_text())["seconds"]
    assert earlier > 0
    monkeypatch.setattr(ResumableStore, "commit", real)
    rc, stdout, _ = _run(["compress", str(src), *SVD, "--out", str(out), "--json"], capsys)
    res = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 0 and res["seconds_total"] == pytest.approx(res["seconds"] + earlier, abs=2e-3)
    assert "in total" in stdout and json.loads((out / "config.json").read_text())["rankdown"]["seconds_earlier"] == earlier


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_an_interrupt_before_the_plan_says_nothing_was_kept(tmp_path, capsys, monkeypatch, stream):
    src, out = _folder(tmp_path), tmp_path / "out"

    def plan(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Method, "plan", plan)
    rc, _, err = _run(["compress", str(src), *SVD, "--out", str(out), stream], capsys)
    assert rc == 130 and len(err.strip().splitlines()) == 1 and "nothing was kept" in err, err
    assert "starts over" in err and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_interrupt_after_the_plan_says_the_plan_is_kept(tmp_path, capsys, monkeypatch):
    src, out = _folder(tmp_path), tmp_path / "out"

    def commit(self, i, layer, records):
        raise KeyboardInterrupt

    monkeypatch.setattr(ResumableStore, "commit", commit)
    rc, _, err = _run(["compress", str(src), *SVD, "--out", str(out)], capsys)
    assert rc == 130 and "its plan (the ranks; no layer finished yet)" in err and "resume" in err, err
    assert json.loads((partial_folder(out) / "state.json").read_text())["ranks"]


# ----------------------------------------------------------------------------- the README's Python snippet
def readme_snippet() -> str:
    """The code block of the README's "## Python" section, exactly as a reader copies it."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_snippet_runs_offline_as_written(tmp_path, monkeypatch, capsys):
    import torch

    import rankdown
    from rankdown.allocate import count_params

    code = readme_snippet()
    assert "wikitext2\"," not in code and "cuda" not in code.replace('device="cpu"', "")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (the README's own code)
    report, small = scope["report"], scope["small"]
    assert report.method == "modegpt" and abs(report.ratio_achieved - 0.3) <= 0.01
    assert count_params(small) == report.params_after < report.params_before
    assert {p.dtype for p in small.parameters()} == {torch.float32}  # saved as it was computed
    assert "params_after" in capsys.readouterr().out
    ids = scope["tok"]("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()
    assert rankdown.FWSVDConfig is rankdown.config_class("fwsvd") and "FWSVDConfig" in rankdown.__all__


def test_load_reference_by_name_is_load_reference():
    import torch

    import rankdown

    model, tok = rankdown.load("reference"), rankdown.load_tokenizer("reference")
    ref, ref_tok = rankdown.load_reference()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = ref_tok("import os", return_tensors="pt").input_ids
    assert torch.equal(tok("import os", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
