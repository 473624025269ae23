"""The generation check: does the model still write? (``rankdown eval --generate``, bench's column)

A fixed prompt set ships with the package (``prompts.json``: natural-language questions and
instructions, and code requests). Each prompt goes through the tokenizer's chat template when it
has one (as a user turn, with the assistant's turn opened), else as plain text; the greedy
continuations (``new_tokens`` each, left-padded batches) are measured per prompt and averaged:

* ``repetition``: the share of repeated 4-grams of the new tokens (:func:`repeated_ngram_fraction`;
  0 = none repeats, near 1 = a loop);
* ``distinct_1`` / ``distinct_2``: distinct unigrams / bigrams over all of them (1 = none repeats).

All three count token ids, not words. The samples themselves are kept, to be read by a person
(:func:`write_samples`: ``generation.jsonl`` and ``generation.md``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from rankdown.config import ConfigError
from rankdown.eval.batched import generate_greedy
from rankdown.eval.generate import distinct_ngram_fraction, repeated_ngram_fraction

logger = logging.getLogger(__name__)


def shipped_prompts() -> list[dict[str, str]]:
    """The generation check's prompts: ``[{"name", "kind" ("text" | "code"), "prompt"}, ...]``."""
    data = json.loads((files("rankdown") / "eval" / "prompts.json").read_text(encoding="utf-8"))
    return list(data["prompts"])


def prompt_set_version() -> int:
    return int(json.loads((files("rankdown") / "eval" / "prompts.json").read_text(encoding="utf-8"))["version"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The token ids of ``prompt``: as a user turn of the chat template (assistant turn opened) when
    ``chat``, else the plain text with the tokenizer's special tokens (a BOS where it adds one)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@dataclass
class GenerationCheck:
    """The averages over the prompts, the settings and the samples (one dict per prompt: name,
    kind, prompt, chat, text, ids, finish, repetition, distinct_1, distinct_2)."""

    repetition: float
    distinct_1: float
    distinct_2: float
    prompts: int
    new_tokens: int
    chat: bool
    tokens: int
    seconds: float
    cpu_s: float
    tokens_per_s: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationCheck":
        return cls(**d)


def generation_check(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str] | str] | None = None, *,
                     new_tokens: int = 64, batch_size: int = 16, chat: bool | None = None,
                     progress: bool = False) -> GenerationCheck:
    """Greedy continuations of ``prompts`` (default: :func:`shipped_prompts`; plain strings are
    taken as ``kind: "text"``), ``new_tokens`` each, with their repetition and distinct-n.
    ``chat``: through the chat template (default: when the tokenizer has one)."""
    if tokenizer is None:
        raise ConfigError("the generation check needs the model's tokenizer")
    items = [p if isinstance(p, dict) else {"name": f"prompt{i}", "kind": "text", "prompt": p}
             for i, p in enumerate(shipped_prompts() if prompts is None else prompts)]
    if not items:
        raise ConfigError("no prompt for the generation check: give at least one")
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not has_chat_template(tokenizer):
        raise ConfigError("chat=True, but the tokenizer has no chat template: leave chat unset (plain text)")
    inputs = [encode_prompt(tokenizer, p["prompt"], use_chat) for p in items]
    conts, timing = generate_greedy(model, tokenizer, inputs, max_new_tokens=new_tokens, batch_size=batch_size,
                                    progress=progress, desc="generation check")
    samples = []
    for p, c in zip(items, conts):
        samples.append({**p, "chat": use_chat, "text": c.text, "ids": c.ids, "finish": c.finish,
                        "repetition": repeated_ngram_fraction(c.ids, 4), "distinct_1": distinct_ngram_fraction(c.ids, 1),
                        "distinct_2": distinct_ngram_fraction(c.ids, 2)})
    mean = lambda k: sum(s[k] for s in samples) / len(samples)
    res = GenerationCheck(repetition=mean("repetition"), distinct_1=mean("distinct_1"), distinct_2=mean("distinct_2"),
                          prompts=len(samples), new_tokens=new_tokens, chat=use_chat, tokens=int(timing["tokens"]),
                          seconds=timing["seconds"], cpu_s=timing["cpu_s"], tokens_per_s=timing["tokens_per_s"], samples=samples)
    logger.info("generation check: repeated 4-grams %.3f, distinct-1 %.3f, distinct-2 %.3f over %d prompts",
                res.repetition, res.distinct_1, res.distinct_2, res.prompts)
    return res


def _write(path: Path, text: str) -> None:
    """Write beside the final name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(folder: str | Path, checks: dict[str, GenerationCheck],
                  names: dict[str, str] | None = None) -> list[Path]:
    """``generation.jsonl`` (one line per model and prompt) and ``generation.md`` (per prompt, each
    model's continuation; the figures on top) in ``folder``, for ``checks`` = {label: result}
    (e.g. ``{"model": ..., "baseline": ...}``) and ``names`` = {label: the model's name}; returns the
    paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"model": label, **s}, ensure_ascii=False) for label, chk in checks.items() for s in chk.samples]
    md = ["# Generation check", "", "Greedy continuations of rankdown's shipped prompts. repetition = share of repeated "
          "4-grams of the new tokens; distinct-n = distinct n-grams / n-grams (token ids).", "",
          *[f"- {label}: `{name}`" for label, name in (names or {}).items() if label in checks], "",
          "| model | repetition | distinct-1 | distinct-2 | chat template | new tokens (mean of at most) |", "|---|---|---|---|---|---|"]
    md += [f"| {label} | {c.repetition:.3f} | {c.distinct_1:.3f} | {c.distinct_2:.3f} | {'yes' if c.chat else 'no'} "
           f"| {c.tokens / max(c.prompts, 1):.1f} of {c.new_tokens} |" for label, c in checks.items()]
    first = next(iter(checks.values()))
    for i, s in enumerate(first.samples):
        md += ["", f"## {s['name']} ({s['kind']})", "", "> " + s["prompt"].replace("\n", "\n> ")]
        for label, c in checks.items():
            if i < len(c.samples):
                t = c.samples[i]
                md += ["", f"**{label}** (repetition {t['repetition']:.3f}, ended by {t['finish']}):", "", "```text",
                       t["text"].replace("```", "'''"), "```"]
    paths = [folder / "generation.jsonl", folder / "generation.md"]
    _write(paths[0], "\n".join(lines) + "\n")
    _write(paths[1], "\n".join(md) + "\n")
    return paths
