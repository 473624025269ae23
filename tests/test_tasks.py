"""lm-evaluation-harness tasks on the reference model, offline: local YAML tasks over JSON files."""

import json
import subprocess
import sys

import pytest

from test_cli import ENV

from rankdown.eval.tasks import TaskError, evaluate_tasks
from rankdown.reference import reference_dir

pytest.importorskip("lm_eval")

N = 24
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _items() -> list[tuple[str, str, str]]:
    """(context, the real next line, that line reversed) from the held-out text the model never saw."""
    lines = [ln for ln in (reference_dir() / "heldout.txt").read_text().splitlines() if len(ln.strip()) > 25]
    out = []
    for a, b in zip(lines[::2], lines[1::2]):
        if b.strip()[::-1] != b.strip():
            out.append((a, " " + b.strip(), " " + b.strip()[::-1]))
        if len(out) == N:
            return out
    raise AssertionError("held-out text too short")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local tasks over the same questions: 'real' labels the real line, 'flipped' the reversed one."""
    d = tmp_path_factory.mktemp("tasks")
    for name, flip in (("rd_real", False), ("rd_flipped", True)):
        data = d / f"{name}.jsonl"
        with data.open("w") as f:
            for ctx, real, rev in _items():
                f.write(json.dumps({"context": ctx, "choices": [real, rev], "label": int(flip)}) + "\n")
        (d / f"{name}.yaml").write_text(YAML.format(name=name, data=data.resolve()))
    hub = YAML.format(name="rd_hub", data="unused").replace("dataset_path: json", "dataset_path: allenai/ai2_arc")
    (d / "rd_hub.yaml").write_text(hub)
    return d


def test_local_task_accuracy(reference, task_dir):
    model, tok = reference
    res = evaluate_tasks(model, tok, "rd_real,rd_flipped", include_path=task_dir, batch_size=8)
    real, flipped = res["rd_real"], res["rd_flipped"]
    assert real["samples"] == flipped["samples"] == N
    for r in (real, flipped):
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 and r["acc_stderr"] >= 0
        assert r["acc"] * N == pytest.approx(round(r["acc"] * N))  # a fraction of the N questions
    # the trained model prefers real code to reversed code; the labels decide the score
    assert real["acc"] >= 0.8
    assert flipped["acc"] == pytest.approx(1 - real["acc"])
    assert not model.training


def test_limit_and_unfetchable_task(reference, task_dir):
    model, tok = reference
    res = evaluate_tasks(model, tok, ["rd_real"], include_path=task_dir, limit=5.0)
    assert res["rd_real"]["samples"] == 5
    with pytest.raises(TaskError, match="'rd_hub'.*could not be fetched.*--include-path"):
        evaluate_tasks(model, tok, "rd_hub", include_path=task_dir)


def test_missing_lm_eval_names_the_extra(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(TaskError, match=r"pip install 'rankdown\[eval\]'"):
        evaluate_tasks(*reference, "rd_real")


@pytest.mark.slow  # two command-line runs of the harness; test_local_task_accuracy runs a task in-process
def test_cli_tasks_json_and_unknown_task(task_dir):
    # both commands at once: the unknown name makes the harness read its own ~15,000 task files
    args = [("--tasks", "rd_real", "--include-path", str(task_dir), "--limit", "6", "--json"),
            ("--tasks", "rd_rael", "--include-path", str(task_dir))]
    procs = [subprocess.Popen([sys.executable, "-m", "rankdown.cli", "eval", "reference", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}) for a in args]
    (ok_out, ok_err), (_, bad_err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, ok_err[-3000:]
    res = json.loads(ok_out.strip().splitlines()[-1])
    assert res["tasks"]["rd_real"]["samples"] == 6 and 0.0 <= res["tasks"]["rd_real"]["acc"] <= 1.0
    assert procs[1].returncode == 2
    assert "unknown task 'rd_rael'" in bad_err and "rd_real" in bad_err and "Traceback" not in bad_err
