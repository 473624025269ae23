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


def test_every_method_config_and_heal_config_are_exported_from_the_package_root():
    import rankdown

    for name in rankdown.method_names():
        cls = rankdown.config_class(name)
        assert getattr(rankdown, cls.__name__) is cls and cls.__name__ in rankdown.__all__, name
    assert "HealConfig" in rankdown.__all__ and rankdown.HealConfig().lr > 0


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


# ----------------------------------------------------------------------------- one obvious command
def test_compress_without_out_is_refused_naming_out_and_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(["compress", "-q"], capsys)
    line = _one_error(rc, err)
    assert "--out DIR" in line and "--dry-run" in line and out == ""
    assert list(tmp_path.iterdir()) == []


def test_the_default_method_is_modegpt_and_help_says_why(capsys):
    from rankdown.cli.parser import build_parser

    assert build_parser().parse_args(["compress"]).method == "modegpt"
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "default modegpt: the best or within 4% of the best" in flat and "4.5x faster than lillama" in flat
    # one line per method on what it does
    from rankdown.methods import METHODS

    listed = [line.split()[0] for line in text.split("methods (--method; default modegpt):\n")[1].splitlines()]
    assert listed == list(METHODS)
    # --allocation: the choices of each method, its default marked
    for per in ("rom: auto (default), fisher, global, uniform, last-k",
                "modegpt: block- influence (default), uniform, fisher", "lillama: auto (default), fisher, strategy",
                "svd: uniform (default), fisher"):
        assert per.replace("block- ", "block-") in flat.replace("block- ", "block-"), per
    for shown in ("lm_head counted), in (0, 1) (default: 0.2)", "calibration windows (default: 128)",
                  "(default: reference for the reference model, else wikitext2)", "(default: 0.25) [modegpt]",
                  "random seed (calibration sampling) (default: 0)"):
        assert shown in flat, shown


@pytest.mark.parametrize("command, shown", [
    ("demo", ["fraction of all parameters to remove (default: 0.3)", "calibration windows (default: 128)"]),
    ("bench", ["(default: 0.1,0.2,0.3,0.4,0.5)", "calibration windows (default: 128)",
               "calibration source (default: reference / wikitext2)"]),
])
def test_every_command_shows_its_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert s in flat, s


@pytest.mark.parametrize("method", ["svd", "rom", "modegpt"])
def test_dry_run_prints_the_plan_that_compress_then_makes_and_writes_nothing(method, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["compress", "--method", method, "--ratio", "0.3", "--nsamples", "16", "-q", "--json"]
    if method == "rom":
        args += ["--allocation", "global"]
    rc, out, _ = _run([*args, "--dry-run"], capsys)
    plan = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and plan["dry_run"] and list(tmp_path.iterdir()) == []
    assert "parameters: 5,573,888 -> " in out and "size on disk: about" in out and "--save-dtype float32" in out
    kind = "kept size" if method == "modegpt" else "rank"
    assert out.splitlines()[0].split() == ["module", *kind.split()]
    rc, out, _ = _run([*args, "--out", str(tmp_path / "o")], capsys)
    done = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and plan["params_after"] == done["params_after"] and plan["save_dtype"] == "float16"
    on_disk = sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))
    assert plan["bytes_on_disk"] <= on_disk <= plan["bytes_on_disk"] * 1.01 + 100_000
    assert done["bytes_on_disk"] == on_disk and "on disk in float16 (--save-dtype float32 changes it)" in out
    record = json.loads((tmp_path / "o" / "config.json").read_text())["rankdown"]["structure"]["modules"]
    if method != "modegpt":
        assert {k: v["rank"] for k, v in record.items()} == plan["ranks"]
    else:  # kept sizes: each attention's v/o and q/k head sizes, each MLP's width
        for name, rec in record.items():
            if rec["type"] == "attention":
                assert plan["ranks"].get(f"{name}.v_proj", rec["head_dim"]) == rec["v_dim"]
                assert plan["ranks"].get(f"{name}.q_proj", rec["head_dim"]) == rec["qk_dim"]
            elif name.endswith("down_proj"):
                assert plan["ranks"][name] == rec["in"]


# ----------------------------------------------------------------------------- inspect
def test_inspect_shows_kept_sizes_biases_numeric_order_and_rank_1(tmp_path, capsys):
    from rankdown.cli.commands import natural_key

    assert sorted(["l.10.a", "l.2.a", "l.1.b", "l.1.a"], key=natural_key) == ["l.1.a", "l.1.b", "l.2.a", "l.10.a"]
    folder = tmp_path / "m"
    assert cli.main(["compress", "--ratio", "0.3", "--nsamples", "8", "-q", "--out", str(folder)]) == 0  # modegpt
    cfg = json.loads((folder / "config.json").read_text())
    modules = cfg["rankdown"]["structure"]["modules"]
    assert list(modules) == sorted(modules)  # the record keeps text order: mlp before self_attn
    # as a 12-layer model's record would read (text order: layer 10 before layer 2), one module at rank 1
    for i in (10, 11):
        modules.update({k.replace("layers.1.", f"layers.{i}."): dict(v) for k, v in modules.items()
                        if k.startswith("model.layers.1.")})
    modules["model.layers.11.self_attn"]["v_dim"] = 1
    modules["model.layers.0.self_attn.q_proj"] = {"type": "lowrank", "in": 256, "out": 256, "bias": True, "rank": 1}
    modules["model.layers.1.self_attn"]["bias"] = {"q": True, "k": True, "v": False, "o": False}
    cfg["rankdown"]["structure"]["modules"] = dict(sorted(modules.items()))
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, out, err = _run(["inspect", str(folder)], capsys)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert [r[0] for r in rows] == sorted(modules, key=natural_key)
    layers = [int(r[0].split(".")[2]) for r in rows]
    assert layers == sorted(layers) and layers[-1] == 11 and 2 in layers
    attn = next(line for line in out.splitlines() if line.startswith("model.layers.1.self_attn "))
    rec = modules["model.layers.1.self_attn"]
    assert f"q/k {rec['qk_dim']}/32, v {rec['v_dim']}/32" in attn and " q,k " in attn and "{" not in attn
    flagged = [r[0] for r in rows if r[-1] == "1!"]
    assert flagged == ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn"]
    assert "2 module(s) left at rank 1" in out
