"""Greedy generation of many prompts in left-padded batches, each row stopped on its own.

Decoding one prompt at a time on a CPU is bound by reading the weights (NOTES.md: a 0.5B model in
float32, 64 tokens in 102 s); a batch shares each read among its rows. Prompts are sorted by
length so that a batch pads little, padded on the left (the last column of every row is a real
token), and the results come back in the order given. A row ends at the model's EOS token or, with
``stop`` strings, as soon as its decoded new text contains one of them (a ``StoppingCriteria``);
``model.generate`` stops the whole batch once every row has ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

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


class _StopStrings(StoppingCriteria):
    """Ends a row once the text of its new tokens contains any of ``stops``; records when."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int, rows: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len
        self.done_at: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        out = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(input_ids.shape[0]):
            if self.done_at[i] is None:
                text = self.tokenizer.decode(new[i].tolist(), skip_special_tokens=True)
                if any(s in text for s in self.stops):
                    self.done_at[i] = new.shape[1]
            out[i] = self.done_at[i] is not None
        return out


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

    Returns the continuations (in the order of ``inputs``) and timing: ``seconds`` (wall) in
    ``model.generate``, ``cpu_s`` the CPU time this process spent there (all threads: on a shared
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
            crit = _StopStrings(tokenizer, stop, width, len(batch)) if stop else None
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=pad,
                                     stopping_criteria=StoppingCriteriaList([crit]) if crit else None)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            new = out[:, width:].cpu()
            for j, i in enumerate(batch):
                results[i] = _one(tokenizer, new[j].tolist(), eos, stop, crit.done_at[j] if crit else None)
    finally:
        model.train(was_training)
    conts = [results[i] for i in range(len(inputs))]
    tokens = sum(len(c.ids) for c in conts)
    timing = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else 0.0}
    logger.info("generated %d tokens for %d prompts in %.1f s, %.1f s of CPU (%.1f tokens/s, batches of %d)", tokens,
                len(conts), seconds, cpu, timing["tokens_per_s"], batch_size)
    return conts, timing


def _one(tokenizer: Any, new: list[int], eos: set[int], stop: Sequence[str], done_at: int | None) -> Continuation:
    """A row's continuation: its ids trimmed after the EOS / the stop step, its text cut at the stop."""
    end = next((k + 1 for k, t in enumerate(new) if t in eos), None)
    finish = "length"
    if end is not None and (done_at is None or end <= done_at):
        new, finish = new[:end], "eos"
    elif done_at is not None:
        new, finish = new[:done_at], "stop"
    text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    if stopped and finish == "length":  # (a stop string that only the final token completed)
        finish = "stop"
    return Continuation(ids=new, text=text, finish=finish)
