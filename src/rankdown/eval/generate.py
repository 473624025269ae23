"""Text generation from a (compressed) causal LM, with a degeneration measure.

A compressed model can keep a decent perplexity and still fall into loops when it writes; the
fraction of repeated n-grams of what it generates (:func:`repeated_ngram_fraction`) shows that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rankdown.arch import UnsupportedModelError
from rankdown.calib.sampling import pad_id
from rankdown.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One generation: ``text`` is the decoded continuation only (special tokens skipped),
    ``tokens`` the number of new tokens (an EOS that ended it included), ``seconds`` the time in
    ``model.generate``, ``repetition`` the :func:`repeated_ngram_fraction` (n=4) of the new tokens."""

    prompt: str
    text: str
    tokens: int
    seconds: float
    repetition: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)


def repeated_ngram_fraction(token_ids: Sequence[int], n: int = 4) -> float:
    """The fraction of the n-grams of ``token_ids`` that repeat an n-gram seen earlier in it.

    A sequence of ``L`` tokens has ``total = L - n + 1`` n-grams (one per start position), of which
    ``unique`` are distinct; the result is ``(total - unique) / total = 1 - unique / total``: 0.0
    when no n-gram occurs twice, close to 1.0 for a sequence that loops. A sequence of fewer than
    ``n + 1`` tokens (at most one n-gram) gives 0.0. Example: ``[1, 2, 3, 4] * 3`` with ``n = 4``
    has 9 n-grams, 4 distinct, so 5/9.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}")
    ids = [int(t) for t in token_ids]
    if len(ids) < n + 1:
        return 0.0
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def distinct_ngram_fraction(token_ids: Sequence[int], n: int = 2) -> float:
    """distinct-n of one sequence: its distinct n-grams over its n-grams (1.0: none repeats; the
    complement of :func:`repeated_ngram_fraction`). A sequence of fewer than ``n + 1`` tokens gives 1.0."""
    return 1.0 - repeated_ngram_fraction(token_ids, n)


def _check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}; "
                          "pass e.g. --max-new-tokens 64")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}; pass e.g. --temperature 0.8 "
                          "(or leave out --sample for greedy decoding)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}; pass e.g. --top-p 0.95 (1 disables it)")


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> GenerationResult:
    """Continue ``prompt`` with ``model.generate``: greedy by default, nucleus sampling at
    ``temperature`` / ``top_p`` with ``sample=True``. The sampling RNG is seeded with ``seed``
    inside a forked RNG state, so a call is reproducible and leaves the global RNG untouched.
    Generation stops after ``max_new_tokens`` or at the model's EOS token."""
    _check_settings(max_new_tokens, temperature, top_p)
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot generate text: it has no language-model head. "
            "Give a causal LM (e.g. a Llama or Qwen folder); encoders support `rankdown eval --fidelity`")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)  # (1, prompt_len)
    if input_ids.shape[1] == 0:
        raise ConfigError(f"the prompt {prompt!r} gives no tokens; pass a non-empty --prompt")
    attention_mask = enc.get("attention_mask", torch.ones_like(input_ids)).to(device)
    settings: dict[str, Any] = {"do_sample": sample}
    if sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # a model's generation_config may set sampling values that greedy decoding would warn about
        settings.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id(tokenizer), **settings)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    new = out[0, input_ids.shape[1] :].tolist()
    result = GenerationResult(prompt=prompt, text=tokenizer.decode(new, skip_special_tokens=True),
                              tokens=len(new), seconds=seconds, repetition=repeated_ngram_fraction(new))
    logger.info("generated %d tokens in %.2f s (repeated 4-grams %.3f)", result.tokens, seconds,
                result.repetition)
    return result
