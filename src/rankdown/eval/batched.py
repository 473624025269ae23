"""Greedy generation of many prompts in left-padded batches, each row stopped on its own.

Decoding one prompt at a time on a CPU is bound by reading the weights (NOTES.md: a 0.5B model in
float32, 64 tokens in 102 s); a batch shares each read among its rows. Prompts are sorted by
length so that a batch pads little, padded on the left (the last column of every row is a real
token), and the results come back in the order given. A row ends at the model's EOS token, after
``max_new_tokens``, or, with ``stop`` strings, as soon as its decoded new text contains one of them.

The loop is ``model.generate``'s greedy search written out (prefill with position ids from the
attention mask, then one token per step through a ``DynamicCache``) for one reason: a row that
has ended leaves the batch (``DynamicCache.batch_select_indices``) instead of being computed until
the longest row ends. On HumanEval the longest row of a batch of 16 is typically 4-5 times the
mean, and at that batch size a CPU step costs nearly in proportion to the rows. The tests check
that its tokens equal ``model.generate``'s, batched or not.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rankdown.calib.sampling import pad_id
from rankdown.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Continuation:
    """One row's result: ``ids`` the new tokens (up to and including the EOS, or up to the step at
    which a stop string appeared), ``text`` their decoded text (special tokens skipped) cut before
    the first stop string, ``finish`` ``"eos"``, ``"stop"`` or ``"length"``."""

    ids: list[int]
    text: str
    finish: str


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the generation config's, else the tokenizer's EOS."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any of ``stops``, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def generate_greedy(model: nn.Module, tokenizer: Any, inputs: Sequence[Sequence[int]], *, max_new_tokens: int,
                    batch_size: int = 16, stop: Sequence[str] = (), progress: bool = False,
                    desc: str = "generate") -> tuple[list[Continuation], dict[str, float]]:
    """Greedy continuations of the token-id lists ``inputs``, ``batch_size`` rows at a time.

    Returns the continuations (in the order of ``inputs``) and timing: ``seconds`` (wall) spent
    decoding, ``cpu_s`` the CPU time this process spent there (all threads: on a shared
    machine, the share of ``seconds`` it got), ``tokens`` the new tokens kept, ``tokens_per_s``
    their rate (wall)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    for i, row in enumerate(inputs):
        if not row:
            raise ConfigError(f"prompt {i} gives no tokens; give non-empty prompts")
    device = next(model.parameters()).device
    pad, eos = pad_id(tokenizer), eos_ids(model, tokenizer)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    results: dict[int, Continuation] = {}
    was_training = model.training
    model.eval()
    seconds = cpu = 0.0
    try:
        for batch in batches:
            width = max(len(inputs[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, i in enumerate(batch):
                row = torch.tensor(list(inputs[i]), dtype=torch.long)
                ids[j, width - len(row) :] = row
                mask[j, width - len(row) :] = 1
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                rows = _decode(model, tokenizer, ids.to(device), mask.to(device), max_new_tokens, eos, stop)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            for j, i in enumerate(batch):
                new, finish = rows[j]
                text, _ = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
                results[i] = Continuation(ids=new, text=text, finish=finish)
    finally:
        model.train(was_training)
    conts = [results[i] for i in range(len(inputs))]
    tokens = sum(len(c.ids) for c in conts)
    timing = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else 0.0}
    logger.info("generated %d tokens for %d prompts in %.1f s, %.1f s of CPU (%.1f tokens/s, batches of %d)", tokens,
                len(conts), seconds, cpu, timing["tokens_per_s"], batch_size)
    return conts, timing


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _decode(model: nn.Module, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
            eos: set[int], stop: Sequence[str]) -> list[tuple[list[int], str]]:
    """Greedy decoding of the left-padded batch ``ids`` / ``mask`` (b, L): per row, its new tokens
    (up to and including the EOS, or up to the token that completed a stop string) and why it ended."""
    from transformers import DynamicCache

    b = ids.shape[0]
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L): each row's positions count its real tokens only
    key = "cache" if _accepts(model, "cache") else "past_key_values"  # (transformers 5 renamed it)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache}, **extra)
    logits = out.logits[:, -1]  # (b, vocab)
    last = pos[:, -1]  # (a,) the position of each active row's last token
    active = list(range(b))  # the batch row of each row still decoding
    new: list[list[int]] = [[] for _ in range(b)]
    finish = ["length"] * b
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (a,)
        keep = []
        for j, row in enumerate(active):
            token = int(nxt[j])
            new[row].append(token)
            if token in eos:
                finish[row] = "eos"
            elif stop and any(s in tokenizer.decode(new[row], skip_special_tokens=True) for s in stop):
                finish[row] = "stop"
            elif len(new[row]) < max_new_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):  # the ended rows leave the batch, their cache with them
            idx = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(idx)
            mask, last, nxt = mask[idx], last[idx], nxt[idx]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{key: cache})
        logits = out.logits[:, -1]
    return [(new[r], finish[r]) for r in range(b)]
