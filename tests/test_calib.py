"""Calibration sources and sampling, on a word-level tokenizer: one token per whitespace word, so
expected token ids are computed independently by a dict lookup of ``text.split()``."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankdown.calib import sources
from rankdown.calib.sampling import calibration_data, source_text
from rankdown.calib.sources import CalibrationError, load_records, load_texts

WORDS = [f"w{i}" for i in range(30)]
VOCAB = {t: i for i, t in enumerate(["<unk>", "<pad>", "<eos>", "user:", "assistant:", *WORDS])}
PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos>\n{% endfor %}"


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def ids_of(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_words // 10)]
    rest = " ".join(rng.choice(WORDS) for _ in range(n_words % 10))
    return "\n".join(lines + ([rest] if rest else []))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    return write(path, "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def window_offset(reference: list[int], row: list[int]) -> int:
    """The unique offset at which ``row`` is a contiguous slice of ``reference``."""
    hits = [o for o in range(len(reference) - len(row) + 1) if reference[o : o + len(row)] == row]
    assert len(hits) == 1, f"row found at offsets {hits}"
    return hits[0]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_windows_are_contiguous_slices_with_exact_counts(tok, tmp_path):
    text = random_text(500, seed=1)
    path = write(tmp_path / "calib.txt", text)
    data = calibration_data(tok, path, nsamples=7, seqlen=16, seed=3)
    reference = ids_of(text)
    assert data.input_ids.shape == (7, 16) and data.input_ids.dtype == torch.long
    assert torch.equal(data.attention_mask, torch.ones(7, 16, dtype=torch.long))
    offsets = [window_offset(reference, row) for row in data.input_ids.tolist()]
    assert all(0 <= o <= 500 - 16 for o in offsets)
    assert data.describe() == {"source": path, "nsamples": 7, "seqlen": 16, "seed": 3, "tokens": 112}
    json.dumps(data.describe())


def test_text_of_exactly_one_window_gives_that_window(tok, tmp_path):
    text = random_text(16, seed=2)
    data = calibration_data(tok, write(tmp_path / "t.txt", text), nsamples=3, seqlen=16)
    assert data.input_ids.tolist() == [ids_of(text)] * 3


def test_seeded_sampling_is_reproducible_and_seed_dependent(tok, tmp_path):
    text = random_text(400, seed=4)
    path = write(tmp_path / "calib.txt", text)
    a = calibration_data(tok, path, nsamples=8, seqlen=8, seed=0)
    b = calibration_data(tok, path, nsamples=8, seqlen=8, seed=0)
    c = calibration_data(tok, path, nsamples=8, seqlen=8, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    reference = ids_of(text)
    offsets_a = [window_offset(reference, r) for r in a.input_ids.tolist()]
    offsets_c = [window_offset(reference, r) for r in c.input_ids.tolist()]
    assert offsets_a != offsets_c


def test_reference_sources_read_the_packaged_files(tok, tmp_path, monkeypatch):
    calib_text = "w1 w2 w3\n\nw4 w5\n\n\nw6"
    (tmp_path / "reference").mkdir()
    write(tmp_path / "reference" / "calib.txt", calib_text)
    write(tmp_path / "reference" / "heldout.txt", "w7 w8")
    seen = []

    def fake_files(package: str) -> Path:
        seen.append(package)
        return tmp_path

    monkeypatch.setattr(sources.importlib.resources, "files", fake_files)
    assert load_texts("reference") == [calib_text]
    assert load_texts("reference-heldout", split="test") == ["w7 w8"]
    assert source_text(tok, "reference") == calib_text
    assert seen == ["rankdown"] * 3
    data = calibration_data(tok, "reference", nsamples=2, seqlen=6)
    assert data.input_ids.tolist() == [ids_of(calib_text)] * 2


def test_jsonl_text_records_are_truncated_and_padded(tok, tmp_path, caplog):
    texts = ["w1 w2 w3", "w4 " * 9 + "w5", "w6", "w7 w8 w9 w10 w11 w12"]
    records = [{"text": t} for t in texts]
    path = write_jsonl(tmp_path / "d.jsonl", records[:2] + [""] + records[2:])  # a blank line is skipped
    with caplog.at_level(logging.WARNING, logger="rankdown.calib.sampling"):
        data = calibration_data(tok, path, nsamples=10, seqlen=6, seed=0)
    assert "4 records, fewer than nsamples=10" in caplog.text
    expected = [ids_of(t)[:6] for t in texts]
    rows = []
    for ids, mask in zip(data.input_ids.tolist(), data.attention_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (6 - n)
        assert ids[n:] == [PAD] * (6 - n)
        rows.append(ids[:n])
    assert sorted(rows) == sorted(expected)
    assert data.describe()["tokens"] == 3 + 6 + 1 + 6
    assert data.input_ids.shape == (4, 6)


def test_jsonl_records_subset_is_seeded(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"w{i} w{i}"} for i in range(20)])
    a = calibration_data(tok, path, nsamples=5, seqlen=4, seed=7)
    b = calibration_data(tok, path, nsamples=5, seqlen=4, seed=7)
    c = calibration_data(tok, path, nsamples=5, seqlen=4, seed=8)
    firsts = [row[0] for row in a.input_ids.tolist()]
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert len(set(firsts)) == 5 and a.tokens == 10


def test_messages_use_the_chat_template_when_present(tmp_path):
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    templated = calibration_data(make_tokenizer(TEMPLATE), path, nsamples=1, seqlen=12)
    want = [VOCAB["user:"], VOCAB["w1"], VOCAB["w2"], EOS, VOCAB["assistant:"], VOCAB["w3"], EOS]
    assert templated.input_ids.tolist() == [want + [PAD] * 5]
    assert templated.attention_mask.tolist() == [[1] * 7 + [0] * 5]
    plain = calibration_data(make_tokenizer(), path, nsamples=1, seqlen=12)
    untemplated = [VOCAB["user:"], VOCAB["w1"], VOCAB["w2"], VOCAB["assistant:"], VOCAB["w3"]]
    assert plain.input_ids.tolist() == [untemplated + [PAD] * 7]
    assert plain.tokens == 5
    assert load_texts(path) == ["user: w1 w2\nassistant: w3"]


def test_json_list_source(tmp_path):
    items = [{"text": "w1"}, {"messages": [{"role": "u", "content": "w2"}]}]
    path = write(tmp_path / "d.json", json.dumps(items))
    assert load_texts(path) == ["w1", "u: w2"]
    with pytest.raises(CalibrationError, match="item 2"):
        load_records(write(tmp_path / "e.json", json.dumps([{"text": "w1"}, {"txt": "w2"}])))
    with pytest.raises(CalibrationError, match="holds no records"):
        load_records(write(tmp_path / "f.json", "[]"))
    with pytest.raises(CalibrationError, match="must hold a JSON list"):
        load_records(write(tmp_path / "g.json", '{"text": "w1"}'))


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (['{"text": "w1"}', "", "{not json"], ["line 3", "not valid JSON"]),
        (['{"text": "w1"}', '{"body": "w2"}'], ["line 2", 'neither a "text" nor a "messages"', "body"]),
        (['{"text": "   "}'], ["line 1", "non-empty string"]),
        (['{"messages": [{"role": "user"}]}'], ["line 1", '"content"']),
        (["[1, 2]"], ["line 1", "expected a JSON object"]),
        (["", "  "], ["bad.jsonl is empty or only whitespace"]),
    ],
)
def test_bad_jsonl_names_the_line(tok, tmp_path, lines, words):
    path = write(tmp_path / "bad.jsonl", "\n".join(lines))
    with pytest.raises(CalibrationError) as err:
        calibration_data(tok, path, nsamples=1, seqlen=4)
    for word in words:
        assert word in str(err.value)


def test_error_messages(tok, tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(CalibrationError) as err:
        load_texts(missing)
    assert missing in str(err.value) and "does not exist" in str(err.value) and "wikitext2" in str(err.value)
    with pytest.raises(CalibrationError, match="empty or only whitespace"):
        load_texts(write(tmp_path / "empty.txt", " \n\t\n"))
    with pytest.raises(CalibrationError) as err:
        load_texts("wikitext3")
    for word in ["unknown calibration source 'wikitext3'", "wikitext2, c4, ptb, reference, reference-heldout",
                 ".jsonl"]:
        assert word in str(err.value)
    with pytest.raises(CalibrationError) as err:
        calibration_data(tok, write(tmp_path / "short.txt", random_text(10, seed=0)), nsamples=2, seqlen=16)
    for word in ["has 10 tokens", "seqlen=16", "lower --seqlen"]:
        assert word in str(err.value)
    with pytest.raises(CalibrationError, match="nsamples must be"):
        calibration_data(tok, "reference", nsamples=0, seqlen=16)
    with pytest.raises(CalibrationError, match="seqlen must be"):
        calibration_data(tok, "reference", nsamples=1, seqlen=1)
    with pytest.raises(CalibrationError, match="not a file"):
        load_texts(str(tmp_path))


def test_wikitext2_offline_fails_fast_with_a_local_file_hint(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets reads the variable when first imported: set its config too, whatever imported it first
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(CalibrationError) as err:
        load_texts("wikitext2")
    assert time.perf_counter() - t0 < 10
    message = str(err.value)
    for word in ["wikitext2 is not in the local datasets cache", "offline", "--calib reference", "--calib prose",
                 "--calib self", "--calib path/to/text.txt"]:
        assert word in message
    assert isinstance(err.value.__cause__, ConnectionError)


def test_hub_sources_call_load_dataset_as_the_papers(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        field = "sentence" if path == "ptb_text_only" else "text"
        return {field: [f"doc {i}" for i in range(1200)] + [""]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # online, as a user with network
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    assert len(load_texts("wikitext2", split="test")) == 1201
    assert len(load_texts("ptb")) == 1201
    assert load_texts("c4", split="test") == [f"doc {i}" for i in range(1100)]
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", {"split": "test"}),
        ("ptb_text_only", "penn_treebank", {"split": "train"}),
        ("allenai/c4", None, {"split": "validation",
                              "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}),
    ]

    def broken(*args, **kwargs):
        raise FileNotFoundError("no such dataset file")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(CalibrationError, match="FileNotFoundError: no such dataset file"):
        load_texts("c4")
