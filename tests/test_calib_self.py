"""The prose sources, mixtures of sources, ``--calib self`` (text the model writes, cached) and the
Hub corpora offline (one line at once, no retries)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import torch
from test_calib import WORDS, make_tokenizer, random_text, write

from rankdown.calib import selfgen, sources
from rankdown.calib.sampling import calibration_data
from rankdown.calib.sources import CalibrationError, check_source, load_texts


def _paragraphs(docs: list[str]) -> set[str]:
    return {p.strip() for d in docs for p in re.split(r"\n\s*\n", d) if len(p.strip()) > 80}


# ----------------------------------------------------------------------------- prose
def test_prose_halves_are_disjoint_balanced_and_deterministic():
    calib, heldout = load_texts("prose"), load_texts("prose-heldout")
    a, b = sum(map(len, calib)), sum(map(len, heldout))
    assert a > 100_000 and b > 100_000 and abs(a - b) < 0.1 * (a + b)
    assert not _paragraphs(calib) & _paragraphs(heldout)  # no paragraph of one half in the other
    assert load_texts("prose") == calib and load_texts("prose-heldout") == heldout


def test_prose_is_text_not_code():
    text = "\n".join(load_texts("prose") + load_texts("prose-heldout"))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert not [ln for ln in lines if ln.lstrip().startswith(">>>")]
    words = re.findall(r"[A-Za-z]+", text)
    common = sum(w.lower() in ("the", "of", "a", "is", "and", "to", "in") for w in words)
    assert common / len(words) > 0.15  # English prose: one word in six or more is one of these


def test_prose_windows_come_from_the_calibration_half(reference):
    _, tok = reference
    data = calibration_data(tok, "prose", nsamples=6, seqlen=48, seed=3)
    again = calibration_data(tok, "prose", nsamples=6, seqlen=48, seed=3)
    assert torch.equal(data.input_ids, again.input_ids) and data.tokens == 6 * 48
    calib, heldout = "\n\n".join(load_texts("prose")), "\n\n".join(load_texts("prose-heldout"))
    for row in data.input_ids:
        words = tok.decode(row[8:-8]).strip()
        assert words in calib and words not in heldout


def test_self_and_mixtures_are_not_evaluation_texts():
    for source in ("self", "reference,prose"):
        with pytest.raises(CalibrationError, match="calibration source only.*prose-heldout"):
            load_texts(source, split="test")


# ----------------------------------------------------------------------------- mixtures
def _clean(text: str, keep: list[str]) -> str:
    return " ".join(w if w in keep else keep[0] for w in text.split())


def test_mixture_takes_equal_shares_in_a_seeded_order(tmp_path: Path):
    tok = make_tokenizer()
    a = write(tmp_path / "a.txt", _clean(random_text(4000, 1), WORDS[:10]))
    b = write(tmp_path / "b.txt", _clean(random_text(4000, 2), WORDS[10:]))
    ids_a = {tok.convert_tokens_to_ids(w) for w in WORDS[:10]}
    for n, (share_a, share_b) in ((6, (3, 3)), (7, (4, 3))):
        data = calibration_data(tok, f"{a},{b}", nsamples=n, seqlen=16, seed=5)
        from_a = [row for row in data.input_ids if set(row.tolist()) <= ids_a]
        assert data.input_ids.shape == (n, 16) and len(from_a) == share_a and n - len(from_a) == share_b
        # each share is what that source alone draws with the seed
        alone = calibration_data(tok, a, nsamples=share_a, seqlen=16, seed=5).input_ids
        assert sorted(map(tuple, alone.tolist())) == sorted(tuple(r.tolist()) for r in from_a)
    again = calibration_data(tok, f"{a},{b}", nsamples=7, seqlen=16, seed=5)
    assert torch.equal(again.input_ids, data.input_ids) and again.source == f"{a},{b}"
    other = calibration_data(tok, f"{a},{b}", nsamples=7, seqlen=16, seed=6)
    assert not torch.equal(other.input_ids, data.input_ids)


def test_mixture_errors_name_the_fix(tmp_path: Path):
    tok = make_tokenizer()
    a = write(tmp_path / "a.txt", random_text(500, 1))
    with pytest.raises(CalibrationError, match="--nsamples 3 or more"):
        calibration_data(tok, f"{a},{a},{a}", nsamples=2, seqlen=8)
    with pytest.raises(CalibrationError, match="empty source between commas"):
        check_source(f"{a},")
    with pytest.raises(CalibrationError, match="unknown calibration source 'nonsense'"):
        check_source("reference,nonsense")
    check_source("self,reference,prose")  # every part known: no error


# ----------------------------------------------------------------------------- self
@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("RANKDOWN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calib"


def _counting(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_self_is_seeded_cached_and_shaped(reference, cache: Path, monkeypatch):
    model, tok = reference
    calls = _counting(model, monkeypatch)
    state = torch.random.get_rng_state()
    data = calibration_data(tok, "self", nsamples=3, seqlen=40, seed=1, model=model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is kept
    assert data.input_ids.shape == (3, 40) and data.tokens == 120 and data.source == "self"
    assert data.input_ids[0, 0] == tok.bos_token_id  # the first row starts from BOS alone
    assert calls and all(n == selfgen.BATCH_SIZE for n in calls)  # left-padded batches
    assert len(list(cache.glob("self-*.safetensors"))) == 1
    n = len(calls)
    again = calibration_data(tok, "self", nsamples=3, seqlen=40, seed=1, model=model)
    assert len(calls) == n and torch.equal(again.input_ids, data.input_ids)  # read back, not generated
    for p in cache.iterdir():  # without the cache, the same seed writes the same text
        p.unlink()
    fresh = calibration_data(tok, "self", nsamples=3, seqlen=40, seed=1, model=model)
    assert len(calls) > n and torch.equal(fresh.input_ids, data.input_ids)
    other = calibration_data(tok, "self", nsamples=3, seqlen=40, seed=2, model=model)
    assert not torch.equal(other.input_ids, data.input_ids)
    assert len(list(cache.glob("self-*.safetensors"))) == 2


def test_self_text_is_the_models_own(reference, cache: Path):
    """Sampled at temperature 1, the model's text is far more likely under it than text it did not
    write: its mean loss is close to the model's entropy, not to the loss on held-out code."""
    model, tok = reference
    data = calibration_data(tok, "self", nsamples=4, seqlen=64, seed=0, model=model)
    held = calibration_data(tok, "reference-heldout", nsamples=4, seqlen=64, seed=0)
    shuffled = data.input_ids.flatten()[torch.randperm(256, generator=torch.Generator().manual_seed(0))].view(4, 64)

    def loss(ids: torch.Tensor) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    assert loss(data.input_ids) < loss(shuffled) - 1.0
    assert loss(data.input_ids) < 2 * loss(held.input_ids)


def test_self_prompts_go_through_the_chat_template(reference):
    _, tok = reference
    plain = selfgen.prompt_ids(tok)
    assert plain[0] == [tok.bos_token_id] and len(plain) == 1 + len(selfgen.SEED_PROMPTS)
    assert tok.decode(plain[1][1:]) == selfgen.SEED_PROMPTS[0]
    templated = make_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos>\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    templated.bos_token = "<eos>"
    rows = selfgen.prompt_ids(templated)
    user, assistant = templated.convert_tokens_to_ids(["user:", "assistant:"])
    assert all(r[0] == user and r[-1] == assistant for r in rows[1:])


def test_self_needs_the_model_and_a_mixture_shares_it(reference, cache: Path, monkeypatch):
    model, tok = reference
    with pytest.raises(CalibrationError, match="needs the dense model"):
        calibration_data(tok, "self", nsamples=2, seqlen=16)
    calls = _counting(model, monkeypatch)
    mixed = calibration_data(tok, "self,reference", nsamples=4, seqlen=32, seed=0, model=model)
    alone = calibration_data(tok, "self", nsamples=2, seqlen=32, seed=0, model=model)
    assert len(calls) == 1  # the mixture wrote the self share; alone it is read from the cache
    rows = {tuple(r) for r in mixed.input_ids.tolist()}
    assert {tuple(r) for r in alone.input_ids.tolist()} <= rows and len(rows) == 4


def test_folder_digest_follows_the_weights(tmp_path: Path):
    import shutil

    from rankdown.reference import reference_dir

    folder = Path(shutil.copytree(reference_dir(), tmp_path / "m"))
    first = selfgen.folder_digest(folder)
    assert selfgen.folder_digest(folder) == first
    weights = next(folder.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little")] ^= 0xFF  # the first byte of data: the first sample reads it
    weights.write_bytes(bytes(raw))
    assert selfgen.folder_digest(folder) != first


# ----------------------------------------------------------------------------- offline
@pytest.fixture
def online_settings(monkeypatch):
    """As on a machine where nothing says offline (the tests' conftest says so by default)."""
    import datasets.config
    import huggingface_hub.constants as hub

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    return datasets.config, hub


def test_wikitext_offline_fails_at_once_naming_the_offline_sources(online_settings, monkeypatch, tmp_path):
    config, hub = online_settings
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    tried: list[tuple] = []

    def unreachable(address, timeout=None, *args, **kwargs):
        tried.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(CalibrationError) as err:
        load_texts("wikitext2")
    assert time.perf_counter() - t0 < 5
    message = str(err.value)
    assert "\n" not in message and "offline" in message
    for choice in ("--calib reference", "--calib prose", "--calib self", "path/to/text.txt"):
        assert choice in message
    assert len(tried) == 1 and tried[0][0] == "huggingface.co"
    assert config.HF_HUB_OFFLINE is False and hub.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(CalibrationError, match="--ppl reference-heldout .*--ppl prose-heldout"):
        load_texts("wikitext2", split="test")


def test_offline_by_environment_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: pytest.fail("probed while offline"))
    with pytest.raises(CalibrationError, match="offline.*--calib prose"):
        load_texts("wikitext2")


def test_streamed_self_loads_the_model_only_to_write_the_text(cache: Path, tmp_path: Path, monkeypatch):
    """A streamed run fingerprints the folder from its files; the whole model is loaded once to write
    the text, and not at all when the text is cached."""
    import rankdown
    from rankdown import loading
    from rankdown.reference import reference_dir
    from rankdown.stream import compress_folder

    loads: list[str] = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name, *a, **k: loads.append(name) or real(name, *a, **k))
    config = rankdown.SVDLLMConfig(ratio=0.2)
    first, _ = compress_folder(reference_dir(), tmp_path / "a", config, "self", nsamples=4, seqlen=64, progress=False)
    assert loads == [str(reference_dir())] and first.calibration["source"] == "self"
    assert first.calibration["tokens"] == 256
    second, _ = compress_folder(reference_dir(), tmp_path / "b", config, "self", nsamples=4, seqlen=64, progress=False)
    assert len(loads) == 1 and second.calibration == first.calibration
    assert len(list(cache.glob("self-*.safetensors"))) == 1


def test_the_command_line_refuses_self_as_an_evaluation_text(capsys):
    from rankdown import cli

    assert cli.main(["eval", "reference", "--ppl", "self", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration source only" in err and "prose-heldout" in err
