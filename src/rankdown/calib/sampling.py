"""Calibration batches: token windows of a text, or whole samples of a JSONL / chat dataset.

Text sources (Hub corpora, the reference texts, ``.txt`` files) are tokenized once as a whole
(documents joined by ``"\\n\\n"``, no special tokens added) and ``nsamples`` windows of ``seqlen``
tokens are cut at random offsets drawn from a ``torch.Generator`` seeded with ``seed``.
Record sources (``.jsonl`` / ``.json``) give one sample per record: its ``text``, or its
``messages`` rendered with the tokenizer's chat template; samples are truncated to ``seqlen`` and
right-padded, with ``attention_mask`` 0 on the padding. ``self`` is text the model writes
(:mod:`.selfgen`). A mixture ``A,B,...`` takes ``nsamples // k`` windows from each of its ``k``
sources (the first ``nsamples % k`` sources one more), each drawn as that source alone would draw
them with ``seed``, and puts the rows in an order drawn with ``seed``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rankdown.calib.sources import SELF, CalibrationError, is_record_source, load_records, load_texts, mixture_parts

logger = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n"


@dataclass
class CalibrationData:
    """Calibration token batches.

    ``input_ids``: (n, seqlen) int64 token ids; ``attention_mask``: (n, seqlen) int64, 1 = real
    token, 0 = right padding (all ones for text windows).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} must be equal (n, seqlen) shapes")

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum().item())

    def __len__(self) -> int:
        return self.nsamples

    def batches(self, batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) slices of at most ``batch_size`` rows, each (b, seqlen)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, self.nsamples, batch_size):
            yield self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: source, nsamples, seqlen, seed and the count of real tokens."""
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "tokens": self.tokens}


def tokenize_text(tokenizer: Any, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """Token ids of a whole text in one call, (ntokens,) int64, without the too-long warning."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def render_record(tokenizer: Any, record: dict[str, Any]) -> str:
    """The text of one record: its ``text``, or its ``messages`` through the tokenizer's chat
    template when it has one, otherwise as ``"role: content"`` lines."""
    if "text" in record:
        return record["text"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def record_ids(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Token ids of one record. A chat template writes its own special tokens, so none are added
    to templated messages; a ``text`` record (or untemplated messages) is a whole document and gets
    the tokenizer's usual ones (e.g. Llama's BOS)."""
    templated = "messages" in record and bool(getattr(tokenizer, "chat_template", None))
    text = render_record(tokenizer, record)
    return list(tokenizer(text, add_special_tokens=not templated, verbose=False)["input_ids"])


def source_text(tokenizer: Any, source: str, split: str | None = None) -> str:
    """The whole text of a source: its documents (or rendered records) joined by ``"\\n\\n"``."""
    if is_record_source(source):
        docs = [render_record(tokenizer, r) for r in load_records(source)]
    else:
        docs = load_texts(source, split=split)
    return DOCUMENT_SEPARATOR.join(docs)


def pad_id(tokenizer: Any) -> int:
    """The id used for right padding: the pad token, else the EOS token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):  # some configs list several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def calibration_data(tokenizer: Any, source: str, nsamples: int = 128, seqlen: int = 2048,
                     seed: int = 0, tokens: int | None = None, model: Any = None) -> CalibrationData:
    """``nsamples`` calibration samples of ``seqlen`` tokens from ``source``, reproducible by ``seed``.

    Text sources: windows at random offsets in ``[0, ntokens - seqlen]`` of the tokenized whole
    text (windows may overlap). Record sources: ``nsamples`` records drawn without replacement
    (all of them, with a warning, when there are fewer), truncated to ``seqlen`` and right-padded
    with :func:`pad_id`. Returns input_ids and attention_mask of shape (nsamples, seqlen).

    ``tokens``: a token budget that replaces ``nsamples``: ``ceil(tokens / seqlen)`` windows of a
    text; records drawn in the same seeded order until their real (truncated) tokens reach it.

    ``model``: the dense model (or the path of its folder) that writes the ``self`` source; only
    that source reads it. A mixture ``A,B``: see the module's docstring (a token budget is shared
    the same way).
    """
    parts = mixture_parts(source)
    if len(parts) > 1:
        return _mixture(tokenizer, source, parts, nsamples, seqlen, seed, tokens, model)
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise CalibrationError(f"tokens must be a whole number >= 1, got {tokens!r}; "
                                   "pass e.g. --calib-tokens 1000000")
        if not is_record_source(source):
            nsamples = -(-tokens // seqlen)
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise CalibrationError(f"nsamples must be a whole number >= 1, got {nsamples!r}; "
                               "pass e.g. --nsamples 128")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise CalibrationError(f"seqlen must be a whole number >= 2 (a token and its successor), "
                               f"got {seqlen!r}; pass e.g. --seqlen 2048")
    generator = torch.Generator().manual_seed(seed)
    if is_record_source(source):
        return _record_samples(tokenizer, source, nsamples, seqlen, seed, generator, tokens)

    check_size(nsamples, seqlen)
    if source == SELF:
        from rankdown.calib.selfgen import self_calibration

        if model is None:
            raise CalibrationError("--calib self needs the dense model to write its text; pass the model "
                                   "(calibration_data(..., model=model)) or another source")
        input_ids = self_calibration(model, tokenizer, nsamples, seqlen, seed)
        return CalibrationData(input_ids, torch.ones_like(input_ids), source, seed)
    ids = tokenize_text(tokenizer, source_text(tokenizer, source))
    warn_if_degenerate(ids, source)
    ntokens = ids.numel()
    if ntokens < seqlen:
        raise CalibrationError(
            f"calibration text {source} has {ntokens} tokens but one window needs seqlen={seqlen}; "
            "lower --seqlen or give more text"
        )
    offsets = torch.randint(0, ntokens - seqlen + 1, (nsamples,), generator=generator)
    input_ids = ids[offsets[:, None] + torch.arange(seqlen)]  # (nsamples, seqlen)
    logger.info("calibration: %d windows of %d tokens from %s (%d tokens, seed %d)",
                nsamples, seqlen, source, ntokens, seed)
    return CalibrationData(input_ids, torch.ones_like(input_ids), source, seed)


def _mixture(tokenizer: Any, source: str, parts: list[str], nsamples: int, seqlen: int, seed: int,
             tokens: int | None, model: Any) -> CalibrationData:
    """Equal shares of each part (see the module's docstring), rows in a seeded order."""
    k = len(parts)
    if tokens is not None:
        shares = [dict(tokens=tokens // k + (i < tokens % k)) for i in range(k)]
    else:
        if nsamples < k:
            raise CalibrationError(f"--nsamples {nsamples} cannot be shared between the {k} sources of {source}; "
                                   f"pass --nsamples {k} or more")
        shares = [dict(nsamples=nsamples // k + (i < nsamples % k)) for i in range(k)]
    datas = [calibration_data(tokenizer, part, seqlen=seqlen, seed=seed, model=model, **share)
             for part, share in zip(parts, shares)]
    input_ids = torch.cat([d.input_ids for d in datas])
    mask = torch.cat([d.attention_mask for d in datas])
    order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
    logger.info("calibration: a mixture of %s (%s windows)", source, ", ".join(str(d.nsamples) for d in datas))
    return CalibrationData(input_ids[order], mask[order], source, seed)


def check_seqlen(model: Any, seqlen: int) -> None:
    """Refuse windows longer than the model's ``max_position_embeddings``: it never saw (or has no
    embedding for) positions past it, so statistics or a perplexity there mean nothing."""
    config = getattr(model, "config", model)  # a model, its config, or config.json's dict
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(seqlen, bool) and isinstance(seqlen, int) and seqlen > limit:
        raise CalibrationError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings ({limit}): it has "
                               f"never seen positions past {limit}; lower --seqlen to {limit} or less")


def check_size(nsamples: int, seqlen: int) -> None:
    """Refuse ``nsamples`` windows of ``seqlen`` tokens whose token ids alone would not fit in this
    machine's memory (their activations take hundreds of times more)."""
    need = 2 * 8 * nsamples * seqlen  # input_ids and attention_mask, int64
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: nothing to compare with
        return
    if need > have:
        raise CalibrationError(
            f"--nsamples {nsamples:,} windows of --seqlen {seqlen:,} tokens is {nsamples * seqlen:,} tokens: their "
            f"ids alone need {need / 2**30:,.0f} GiB and this machine has {have / 2**30:,.0f} GiB of memory; "
            "lower --nsamples (the papers use 128)")


def warn_if_degenerate(ids: torch.Tensor, source: str) -> None:
    """Warn when a calibration text is degenerate (a few distinct tokens repeated, e.g. a file of NUL
    bytes): statistics from it say nothing about the text the model will see."""
    if ids.numel() == 0:
        return
    values, counts = ids.unique(return_counts=True)
    top = float(counts.max()) / ids.numel()
    if values.numel() < 16 or top > 0.5:
        logger.warning("calibration text %s is degenerate: its %d tokens hold %d distinct ones, the commonest "
                       "%.0f%% of them; statistics from it do not represent real text: give natural text of the "
                       "kind the model will see", source, ids.numel(), values.numel(), 100 * top)


def _record_samples(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int,
                    generator: torch.Generator, tokens: int | None = None) -> CalibrationData:
    records = load_records(source)
    order = torch.randperm(len(records), generator=generator).tolist()
    rows: list[tuple[int, list[int]]] = []
    count = 0
    for index in order:
        if (count >= tokens) if tokens is not None else (len(rows) >= nsamples):
            break
        ids = record_ids(tokenizer, records[index])[:seqlen]
        if not ids:
            raise CalibrationError(f"record {index + 1} of {source} tokenizes to no tokens; "
                                   "remove it or give it some text")
        rows.append((index, ids))
        count += len(ids)
    if tokens is not None and count < tokens:
        logger.warning("calibration: %s holds %d tokens (seqlen %d), fewer than the budget of %d; using all of it",
                       source, count, seqlen, tokens)
    elif tokens is None and len(records) < nsamples:
        logger.warning("calibration: %s has %d records, fewer than nsamples=%d; using all of them",
                       source, len(records), nsamples)
    fill = pad_id(tokenizer)
    input_ids = torch.full((len(rows), seqlen), fill, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seqlen), dtype=torch.long)
    for row, (_, ids) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    data = CalibrationData(input_ids, attention_mask, source, seed)
    logger.info("calibration: %d records of %s, %d real tokens (seqlen %d, seed %d)",
                data.nsamples, source, data.tokens, seqlen, seed)
    return data
