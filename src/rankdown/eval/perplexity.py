"""Perplexity on non-overlapping windows, the protocol of the compression papers.

The whole evaluation text (documents joined by ``"\\n\\n"``) is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens, the last partial window dropped. Each window
predicts its tokens 1..seqlen-1 from the ones before, so ``tokens = windows * (seqlen - 1)`` and
``ppl = exp(total NLL / tokens)``. The NLL is computed here from the logits (float32 per batch,
summed in float64), so any model whose forward takes ``input_ids`` and returns ``.logits`` works.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankdown.calib.sampling import check_seqlen, source_text, tokenize_text
from rankdown.calib.sources import CalibrationError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity of a model on a text. ``nll`` is the mean NLL per predicted token (nats);
    ``seconds`` the time spent running the model (tokenization excluded)."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    source_or_text: str,
    seqlen: int = 2048,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
    text: str | None = None,
    progress: bool = False,
    add_special_tokens: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a source's evaluation text.

    ``source_or_text`` is a source (``wikitext2``, ``c4``, ``ptb``: their test split, c4's
    validation documents; ``reference-heldout``; a ``.txt`` / ``.jsonl`` path). To evaluate a
    string, pass it as ``text``; ``source_or_text`` is then only the label of the result.
    ``max_windows`` keeps the first windows only. ``add_special_tokens`` tokenizes the text as the
    GPTQ / SparseGPT code does (``tokenizer(text)``: e.g. one BOS at its start for Llama).
    The model runs in eval mode under ``torch.inference_mode()`` on ``device`` (default: the
    model's; a model elsewhere is moved there, and left there) and its training mode is restored
    afterwards.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise CalibrationError(f"seqlen must be a whole number >= 2, got {seqlen!r}; pass e.g. --seqlen 2048")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise CalibrationError(f"max_windows must be None or a whole number >= 1, got {max_windows!r}")
    check_seqlen(model, seqlen)
    if text is None:
        text = source_text(tokenizer, source_or_text, split="test")
    ids = tokenize_text(tokenizer, text, add_special_tokens=add_special_tokens)  # (ntokens,)
    windows = ids.numel() // seqlen
    if windows == 0:
        raise CalibrationError(
            f"evaluation text {source_or_text} has {ids.numel()} tokens but needs at least "
            f"seqlen={seqlen} for one window; lower --seqlen or give more text"
        )
    if max_windows is not None:
        windows = min(windows, max_windows)
    batches = ids[: windows * seqlen].view(windows, seqlen)  # (windows, seqlen)

    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        if _model_device(model) != device:
            model.to(device)
    was_training = model.training
    model.eval()
    forward_kwargs = _forward_kwargs(model)
    starts = range(0, windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=math.ceil(windows / batch_size), desc="perplexity", unit="batch", leave=False)
    total_nll = 0.0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in starts:
                batch = batches[start : start + batch_size].to(device)  # (b, seqlen)
                logits = model(input_ids=batch, **forward_kwargs).logits  # (b, seqlen, vocab)
                pred = logits[:, :-1, :].float()
                nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), batch[:, 1:].reshape(-1),
                                      reduction="sum")
                total_nll += float(nll.item())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    tokens = windows * (seqlen - 1)
    mean_nll = total_nll / tokens
    result = PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, tokens=tokens, windows=windows,
                              seqlen=seqlen, seconds=seconds, source=source_or_text)
    logger.info("perplexity %.4f on %s (%d windows of %d tokens, %.1f s)",
                result.ppl, source_or_text, windows, seqlen, seconds)
    return result


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward accepts it: no KV cache is needed to score text."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}
