"""Perplexity protocol on a tiny Llama and a word-level tokenizer (one token per whitespace word,
so token and window counts follow from the word count alone)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from rankdown.calib import sources
from rankdown.calib.sources import CalibrationError
from rankdown.eval import PerplexityResult, perplexity

WORDS = [f"w{i}" for i in range(30)]
VOCAB = {t: i for i, t in enumerate(["<unk>", "<pad>", "<eos>", *WORDS])}
SEQLEN = 16


def random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread (and do not fight a busy machine's other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text() -> str:
    return random_text(10 * SEQLEN + 5, seed=0)  # 10 full windows and a dropped partial one


def reference_ppl(model: LlamaForCausalLM, text: str, seqlen: int) -> tuple[float, int, int]:
    """exp(mean NLL) the long way: each window alone, log-softmax in float64, per-token gather."""
    ids = torch.tensor([VOCAB[w] for w in text.split()])
    windows = len(ids) // seqlen
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    return math.exp(total / count), windows, count


def test_counts_and_value_match_an_independent_computation(model, tok, text):
    result = perplexity(model, tok, "tiny", seqlen=SEQLEN, text=text)
    want, windows, tokens = reference_ppl(model, text, SEQLEN)
    assert (result.windows, result.tokens, result.seqlen) == (10, 10 * (SEQLEN - 1), SEQLEN)
    assert (windows, tokens) == (10, 150)
    assert result.ppl == pytest.approx(want, rel=1e-5)
    assert result.nll == pytest.approx(math.log(want), rel=1e-5)
    assert result.source == "tiny" and result.seconds >= 0


def test_batch_size_does_not_change_the_result(model, tok, text):
    one = perplexity(model, tok, "tiny", seqlen=SEQLEN, text=text, batch_size=1)
    three = perplexity(model, tok, "tiny", seqlen=SEQLEN, text=text, batch_size=3)  # 3+3+3+1 windows
    assert three.windows == one.windows == 10
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_uniform_logits_give_the_vocabulary_size(model, tok, text):
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    result = perplexity(uniform, tok, "tiny", seqlen=SEQLEN, text=text, batch_size=4)
    assert result.ppl == pytest.approx(len(VOCAB), rel=1e-6)
    assert result.nll == pytest.approx(math.log(len(VOCAB)), rel=1e-6)


def test_max_windows_keeps_the_first_windows(model, tok, text):
    result = perplexity(model, tok, "tiny", seqlen=SEQLEN, text=text, max_windows=4)
    first = " ".join(text.split()[: 4 * SEQLEN])
    want, windows, tokens = reference_ppl(model, first, SEQLEN)
    assert (result.windows, result.tokens) == (windows, tokens) == (4, 60)
    assert result.ppl == pytest.approx(want, rel=1e-5)


def test_file_and_reference_heldout_sources_use_the_whole_text(model, tok, text, tmp_path, monkeypatch):
    heldout = text + "\n\n" + random_text(40, seed=1)  # 205 words: 12 windows of 16
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "heldout.txt").write_text(heldout, encoding="utf-8")
    monkeypatch.setattr(sources.importlib.resources, "files", lambda package: tmp_path)
    from_ref = perplexity(model, tok, "reference-heldout", seqlen=SEQLEN)
    path = tmp_path / "eval.txt"
    path.write_text(heldout, encoding="utf-8")
    from_file = perplexity(model, tok, str(path), seqlen=SEQLEN, batch_size=5)
    want, windows, tokens = reference_ppl(model, heldout, SEQLEN)
    assert (windows, tokens) == (12, 180)
    assert (from_ref.windows, from_ref.tokens) == (from_file.windows, from_file.tokens) == (12, 180)
    assert from_ref.ppl == pytest.approx(want, rel=1e-5)
    assert from_file.ppl == pytest.approx(want, rel=1e-5)
    assert from_ref.source == "reference-heldout" and from_file.source == str(path)


def test_opt_model(tok, text):
    """Any forward(input_ids=...) -> .logits works: an OPT model (learned positions, no RoPE)."""
    torch.manual_seed(1)
    config = OPTConfig(vocab_size=len(VOCAB), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    opt = OPTForCausalLM(config).eval()
    result = perplexity(opt, tok, "tiny", seqlen=SEQLEN, text=text, batch_size=2)
    want, windows, tokens = reference_ppl(opt, text, SEQLEN)
    assert (result.windows, result.tokens) == (windows, tokens) == (10, 150)
    assert result.ppl == pytest.approx(want, rel=1e-5)


def test_training_mode_is_restored_and_result_serializes(model, tok, text):
    model.train()
    try:
        result = perplexity(model, tok, "tiny", seqlen=SEQLEN, text=text, progress=True)
        assert model.training
    finally:
        model.eval()
    assert isinstance(result, PerplexityResult)
    assert set(result.to_dict()) == {"ppl", "nll", "tokens", "windows", "seqlen", "seconds", "source"}


def test_too_short_text_and_bad_arguments(model, tok, tmp_path):
    with pytest.raises(CalibrationError) as err:
        perplexity(model, tok, "tiny", seqlen=SEQLEN, text=random_text(SEQLEN - 1, seed=0))
    assert f"has {SEQLEN - 1} tokens" in str(err.value) and f"seqlen={SEQLEN}" in str(err.value)
    assert "lower --seqlen" in str(err.value)
    with pytest.raises(CalibrationError, match="seqlen must be"):
        perplexity(model, tok, "tiny", seqlen=1, text="w1 w2")
    with pytest.raises(CalibrationError, match="batch_size must be"):
        perplexity(model, tok, "tiny", seqlen=2, batch_size=0, text="w1 w2")
    with pytest.raises(CalibrationError, match="does not exist"):
        perplexity(model, tok, str(tmp_path / "missing.txt"), seqlen=SEQLEN)
