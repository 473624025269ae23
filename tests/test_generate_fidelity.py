"""Generation (greedy equals an argmax loop, seeded sampling) and fidelity of a model to its
original (KL / top-1 for causal LMs, cosine / neighbour agreement for encoders), on tiny models with
a word-level tokenizer (one token per whitespace word), plus the CLI end to end."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankdown.arch import UnsupportedModelError
from rankdown.calib.sources import CalibrationError
from rankdown.config import ConfigError
from rankdown.eval.fidelity import fidelity, read_passages
from rankdown.eval.generate import generate_text, repeated_ngram_fraction
from test_cli import last_json, rankdown
from tiny import VOCAB, tiny_model

SPECIAL = ["<unk>", "<pad>", "<eos>"]  # ids 0, 1, 2: 2 is the tiny Llama's eos_token_id
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def passages(lengths: list[int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def noised(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with Gaussian noise of std ``scale`` added to one weight matrix."""
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    weight = params.get("encoder.layer.0.output.dense.weight", params.get("model.layers.0.mlp.down_proj.weight"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.add_(scale * torch.randn(weight.shape, generator=g))
    return other


# ----------------------------------------------------------------------------- repetition
@pytest.mark.parametrize("ids, n, expected", [
    ([1, 2, 3, 4] * 3, 4, 5 / 9),  # 9 four-grams, 4 distinct
    ([1, 2, 3, 4, 5, 6], 4, 0.0),  # 3 four-grams, all distinct
    ([7] * 10, 4, 6 / 7),  # 7 four-grams, 1 distinct
    ([1, 2, 1, 2, 1], 2, 0.5),  # 12 21 12 21
    ([1, 1, 2], 1, 1 / 3),
    ([1, 2, 3, 4], 4, 0.0),  # fewer than n + 1 tokens
    ([], 4, 0.0),
])
def test_repeated_ngram_fraction_exact(ids, n, expected):
    assert repeated_ngram_fraction(ids, n) == pytest.approx(expected, abs=1e-12)


def test_repeated_ngram_fraction_rejects_bad_n():
    with pytest.raises(ConfigError, match="n must be"):
        repeated_ngram_fraction([1, 2, 3], 0)


# ----------------------------------------------------------------------------- generation
def test_greedy_is_deterministic_and_equals_argmax_loop(tok):
    model = tiny_model("llama")
    prompt = "w3 w17 w40 w5"
    first = generate_text(model, tok, prompt, max_new_tokens=6)
    again = generate_text(model, tok, prompt, max_new_tokens=6)
    assert (again.text, again.tokens, again.repetition) == (first.text, first.tokens, first.repetition)

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == model.generation_config.eos_token_id:
                break
    assert first.tokens == len(new)
    assert first.text == tok.decode(new, skip_special_tokens=True)
    assert first.repetition == repeated_ngram_fraction(new)


def test_sampling_is_reproducible_by_seed_and_leaves_global_rng(tok):
    model = tiny_model("llama")
    run = lambda seed: generate_text(model, tok, "w1 w2", max_new_tokens=24, sample=True, temperature=1.0,
                                     top_p=1.0, seed=seed)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = run(0)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG stream is untouched
    assert run(0).text == a.text
    assert run(1).text != a.text
    assert len(a.text.split()) >= 2  # a near-uniform tiny model: many distinct words were sampled


def test_generation_errors(tok):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_text(model, tok, "w1", max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        generate_text(model, tok, "w1", sample=True, top_p=1.5)
    with pytest.raises(UnsupportedModelError, match="cannot generate"):
        generate_text(tiny_model("bert"), tok, "w1")


# ----------------------------------------------------------------------------- fidelity
def test_causal_fidelity_to_itself_is_exact(tok):
    model = tiny_model("llama")
    texts = passages([5, 30, 12, 3])
    res = fidelity(model, model, tok, texts, seqlen=16, batch_size=3)
    assert res.kind == "causal" and res.passages == 4
    assert res.tokens == 5 + 16 + 12 + 3  # truncated to seqlen, padding not counted
    assert abs(res.kl) < 1e-7 and res.top1_agreement == 1.0
    assert {"kl", "top1_agreement", "passages", "tokens"} <= set(res.to_dict())
    assert "cosine" not in res.to_dict()


def test_causal_kl_grows_with_noise_and_ignores_padding(tok):
    model = tiny_model("llama")
    texts = passages([8, 20, 13, 4, 17])
    small, large = noised(model, 0.02), noised(model, 0.2)
    kl_small = fidelity(small, model, tok, texts, batch_size=2)
    kl_large = fidelity(large, model, tok, texts, batch_size=2)
    assert 0 < kl_small.kl < kl_large.kl
    assert kl_large.top1_agreement < 1.0
    unpadded = fidelity(large, model, tok, texts, batch_size=1)  # right padding must change nothing
    assert unpadded.kl == pytest.approx(kl_large.kl, rel=1e-4)
    assert unpadded.top1_agreement == kl_large.top1_agreement


def test_encoder_fidelity(tok):
    model = tiny_model("bert")
    texts = passages([6, 25, 11, 9, 14], seed=3)
    same = fidelity(model, model, tok, texts, batch_size=2)
    assert same.kind == "encoder" and same.tokens == 6 + 25 + 11 + 9 + 14
    assert same.cosine == pytest.approx(1.0, abs=1e-6) and same.neighbour_agreement == 1.0
    assert "kl" not in same.to_dict()
    other = fidelity(noised(model, 0.5), model, tok, texts, batch_size=2)
    assert other.cosine < 1.0 - 1e-6
    far = fidelity(noised(model, 1.0), model, tok, texts, batch_size=2)  # measured: cosine 0.70, neighbours 0.6
    assert far.cosine < other.cosine and far.neighbour_agreement < 1.0
    with pytest.raises(CalibrationError, match="at least 3 passages"):
        fidelity(model, model, tok, texts[:2])


def test_fidelity_rejects_mismatched_vocabularies(tok):
    model = tiny_model("llama")
    bigger = copy.deepcopy(model)
    bigger.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(CalibrationError, match="different vocabularies"):
        fidelity(bigger, model, tok, passages([4, 4, 4]))


def test_read_passages(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\nsame passage\n\n\nsecond\n  \nthird\n\n")
    assert read_passages(path) == ["first line\nsame passage", "second", "third"]
    with pytest.raises(CalibrationError, match="does not exist"):
        read_passages(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(CalibrationError, match="is empty"):
        read_passages(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_json():
    res = last_json(rankdown("generate", "reference", "--prompt", "def main(", "--max-new-tokens", "16", "--json"))
    assert res["prompt"] == "def main(" and isinstance(res["text"], str) and res["text"]
    assert 1 <= res["tokens"] <= 16  # 16 unless the model ended with its EOS
    assert 0.0 <= res["repetition"] <= 1.0 and res["seconds"] > 0


def test_cli_eval_fidelity_and_missing_metric(tmp_path):
    from rankdown.reference import reference_dir

    blocks = [b for b in (reference_dir() / "heldout.txt").read_text().split("\n\n") if len(b) > 200][:4]
    texts = tmp_path / "passages.txt"
    texts.write_text("\n\n".join(b[:300] for b in blocks))
    res = last_json(rankdown("eval", "reference", "--fidelity", "reference", "--texts", str(texts), "--json"))
    assert res["passages"] == len(read_passages(texts)) >= 3 and res["tokens"] > 0
    assert abs(res["kl"]) < 1e-6 and res["top1_agreement"] == 1.0

    proc = rankdown("eval", "reference", check=False)
    assert proc.returncode == 2
    assert "--ppl" in proc.stderr and "--fidelity" in proc.stderr and "Traceback" not in proc.stderr
