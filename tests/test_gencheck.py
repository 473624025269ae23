"""The generation check (rankdown eval --generate): shipped prompts, chat formatting, figures that
agree with the samples written, the dense model's figures cached by content."""

from __future__ import annotations

import json

import pytest

from rankdown.eval.cache import cached_figures, source_digest
from rankdown.eval.gencheck import encode_prompt, generation_check, shipped_prompts, write_samples
from rankdown.eval.generate import distinct_ngram_fraction, repeated_ngram_fraction
from test_cli import last_json, rankdown
from test_humaneval import char_tok  # noqa: F401  (a fixture)
from tiny import tiny_model


def test_shipped_prompts_mix_text_and_code():
    prompts = shipped_prompts()
    kinds = [p["kind"] for p in prompts]
    assert len(prompts) >= 10 and kinds.count("text") >= 5 and kinds.count("code") >= 3
    assert len({p["name"] for p in prompts}) == len(prompts) and all(p["prompt"].strip() for p in prompts)


def test_distinct_n_is_the_complement_of_the_repeated_share():
    assert distinct_ngram_fraction([1, 2, 1, 2, 1], 2) == pytest.approx(0.5)
    assert distinct_ngram_fraction([5, 6, 7], 1) == 1.0 and distinct_ngram_fraction([], 2) == 1.0


def test_generation_check_on_a_tiny_model_writes_samples_that_give_its_figures(char_tok, tmp_path):  # noqa: F811
    model = tiny_model("llama")
    res = generation_check(model, char_tok, new_tokens=16, batch_size=5)
    assert res.prompts == len(shipped_prompts()) and not res.chat  # (no chat template)
    paths = write_samples(tmp_path, {"model": res})
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in shipped_prompts()]
    for row in rows:
        assert 1 <= len(row["ids"]) <= 16
        assert row["repetition"] == repeated_ngram_fraction(row["ids"], 4)
        assert row["distinct_2"] == distinct_ngram_fraction(row["ids"], 2)
        assert row["text"] == char_tok.decode(row["ids"], skip_special_tokens=True)
    for key in ("repetition", "distinct_1", "distinct_2"):
        assert getattr(res, key) == pytest.approx(sum(r[key] for r in rows) / len(rows))
    assert res.tokens == sum(len(r["ids"]) for r in rows)
    md = paths[1].read_text()
    assert all(r["prompt"] in md for r in rows) and f"{res.repetition:.3f}" in md
    # the same prompts one batch at a time give the same continuations (left padding changes nothing)
    again = generation_check(model, char_tok, new_tokens=16, batch_size=1)
    assert [s["ids"] for s in again.samples] == [r["ids"] for r in rows]


def test_a_looping_model_scores_high_repetition(char_tok):  # noqa: F811
    import torch

    model = tiny_model("llama")
    with torch.no_grad():  # every logit 0: greedy picks token 0 at every step
        model.lm_head.weight.zero_()
    res = generation_check(model, char_tok, ["abc", "xyz"], new_tokens=20)
    assert [s["ids"] for s in res.samples] == [[0] * 20] * 2
    assert res.repetition == pytest.approx(16 / 17) and res.distinct_1 == pytest.approx(0.05)


def test_chat_template_is_used_when_the_tokenizer_has_one(char_tok):  # noqa: F811
    import copy

    tok = copy.deepcopy(char_tok)
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    assert tok.decode(encode_prompt(tok, "hi", chat=True)) == "<hi>:"
    res = generation_check(tiny_model("llama"), tok, ["hi"], new_tokens=4)
    assert res.chat and res.samples[0]["chat"]


def test_dense_figures_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls = []
    measure = lambda: calls.append(1) or {"x": len(calls)}
    assert cached_figures(str(folder), "k", {"a": 1}, measure) == ({"x": 1}, False)
    assert cached_figures(str(folder), "k", {"a": 1}, measure) == ({"x": 1}, True)
    assert cached_figures(str(folder), "k", {"a": 2}, measure) == ({"x": 2}, False)  # other settings
    before = source_digest(str(folder))
    (folder / "config.json").write_text('{"changed": 1}')
    assert source_digest(str(folder)) != before
    assert cached_figures(str(folder), "k", {"a": 1}, measure) == ({"x": 3}, False)  # other content
    assert cached_figures("some/hub-id", "k", {}, measure) == ({"x": 4}, False)  # no digest: never cached
    assert cached_figures("some/hub-id", "k", {}, measure) == ({"x": 5}, False)


def test_cli_generate_with_a_cached_baseline(tmp_path, monkeypatch):
    import test_cli

    # the command runs in a subprocess with test_cli.ENV: the empty cache must reach it there
    monkeypatch.setitem(test_cli.ENV, "RANKDOWN_CACHE", str(tmp_path / "cache"))
    args = ["eval", "reference", "--generate", "--new-tokens", "12", "--baseline", "reference", "--out",
            str(tmp_path / "out"), "--json"]
    first = last_json(rankdown(*args))
    second = last_json(rankdown(*args))
    g1, g2 = first["generate"], second["generate"]
    assert g1["baseline"]["cached"] is False and g2["baseline"]["cached"] is True
    assert g1["repetition"] == g1["baseline"]["repetition"] == g2["baseline"]["repetition"]  # the same model
    rows = [json.loads(line) for line in (tmp_path / "out" / "generation.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["model"] == "model"]
    assert len(mine) == g1["prompts"] == len([r for r in rows if r["model"] == "baseline"])
    assert g1["repetition"] == pytest.approx(sum(repeated_ngram_fraction(r["ids"], 4) for r in mine) / len(mine))
    assert (tmp_path / "out" / "generation.md").is_file()


def test_cli_warns_when_only_one_model_has_a_chat_template(tmp_path, monkeypatch):
    import shutil

    from rankdown.reference import reference_dir

    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "cache"))
    chatty = tmp_path / "chatty"
    shutil.copytree(reference_dir(), chatty)
    (chatty / "chat_template.jinja").write_text("{% for m in messages %}# {{ m['content'] }}\n{% endfor %}")
    proc = rankdown("eval", "reference", "--generate", "--new-tokens", "4", "--baseline", str(chatty), "--out",
                    str(tmp_path / "out"), "--json")
    res = last_json(proc)["generate"]
    assert res["chat"] is False and res["baseline"]["chat"] is True
    assert "warning: only the baseline's tokenizer has a chat template" in proc.stderr
