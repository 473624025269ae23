"""How closely a compressed model reproduces its original on a set of passages.

Causal LMs: the next-token distributions of the two models at every non-padding position, as the
mean ``KL(original || compressed)`` (nats) and the fraction of positions where their argmax
agrees. Encoders (no ``.logits`` in the output): each passage's embedding is the mean of the last
hidden states over its non-padding tokens; reported are the mean cosine similarity between the
two models' embeddings of a passage, and how often a passage's nearest neighbour among the other
passages (by cosine) is the same under both models.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankdown.calib.sampling import pad_id
from rankdown.calib.sources import CalibrationError
from rankdown.eval.perplexity import _forward_kwargs, _model_device

logger = logging.getLogger(__name__)


@dataclass
class FidelityResult:
    """Agreement of a compressed model with its original. ``kind`` is ``"causal"`` (``kl``,
    ``top1_agreement`` set) or ``"encoder"`` (``cosine``, ``neighbour_agreement`` set); ``tokens``
    counts the non-padding positions compared; ``seconds`` the time spent running both models."""

    kind: str
    passages: int
    tokens: int
    seqlen: int
    seconds: float
    kl: float | None = None
    top1_agreement: float | None = None
    cosine: float | None = None
    neighbour_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields that apply to this kind of model."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_passages(path: str | Path) -> list[str]:
    """The passages of a text file: blocks separated by blank lines, each stripped."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"passage file {path} does not exist; give a text file with passages "
                               "separated by blank lines (--texts FILE)")
    text = path.read_text(encoding="utf-8")
    passages = [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]
    if not passages:
        raise CalibrationError(f"passage file {path} is empty; write passages separated by blank lines")
    return passages


def _batches(tokenizer: Any, passages: list[str], seqlen: int, batch_size: int):
    """Right-padded ``(input_ids, attention_mask)`` batches, each (b, longest passage in batch)."""
    ids = [tokenizer(p, add_special_tokens=True, verbose=False)["input_ids"][:seqlen] for p in passages]
    for i, row in enumerate(ids):
        if not row:
            raise CalibrationError(f"passage {i} gives no tokens; remove it from the passage file")
    pad = pad_id(tokenizer)
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        yield input_ids, mask


def _run(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, torch.Tensor]:
    """("causal", logits) or ("encoder", last hidden states), float32 on the CPU, (b, L, ·)."""
    device = _model_device(model)
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **_forward_kwargs(model))
    logits = getattr(out, "logits", None)
    if logits is not None:
        return "causal", logits.float().cpu()
    return "encoder", out.last_hidden_state.float().cpu()


def _check_vocab(model: nn.Module, original: nn.Module, tokenizer: Any) -> None:
    sizes = [m.get_input_embeddings().num_embeddings for m in (model, original)]
    if sizes[0] != sizes[1]:
        raise CalibrationError(f"the models have different vocabularies ({sizes[0]} vs {sizes[1]} tokens): "
                               "compare a compressed model with the model it was compressed from")
    if len(tokenizer) > sizes[0]:
        raise CalibrationError(f"the tokenizer has {len(tokenizer)} tokens but the models only {sizes[0]}: "
                               "use the tokenizer the models were trained with")


def fidelity(model: nn.Module, original: nn.Module, tokenizer: Any, passages: list[str], seqlen: int = 512,
             batch_size: int = 8, progress: bool = False) -> FidelityResult:
    """Agreement of ``model`` (compressed) with ``original`` on ``passages``, each truncated to
    ``seqlen`` tokens and tokenized with ``tokenizer`` (the compressed model's; both models must
    share its vocabulary). Encoders need at least 3 passages (a nearest neighbour among the
    others). Both models run in eval mode under ``torch.inference_mode()``; their training mode is
    restored afterwards."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise CalibrationError(f"seqlen must be a whole number >= 1, got {seqlen!r}; pass e.g. --seqlen 512")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not passages:
        raise CalibrationError("no passages to compare the models on; give at least one")
    _check_vocab(model, original, tokenizer)
    modes = [model.training, original.training]
    model.eval()
    original.eval()
    kl_sum, agree, tokens = 0.0, 0, 0
    emb_a: list[torch.Tensor] = []
    emb_b: list[torch.Tensor] = []
    kinds: set[str] = set()
    batches = _batches(tokenizer, passages, seqlen, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(passages) // batch_size), desc="fidelity", unit="batch", leave=False)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for input_ids, mask in batches:
                kind_a, out_a = _run(model, input_ids, mask)
                kind_b, out_b = _run(original, input_ids, mask)
                kinds.update((kind_a, kind_b))
                if len(kinds) > 1:
                    raise CalibrationError("one model is a causal LM and the other an encoder: compare a "
                                           "compressed model with the model it was compressed from")
                if out_a.shape != out_b.shape:
                    raise CalibrationError(f"the models' outputs differ in shape ({tuple(out_a.shape)} vs "
                                           f"{tuple(out_b.shape)}): compare a compressed model with its original")
                keep = mask.bool()  # (b, L)
                tokens += int(keep.sum())
                if kind_a == "causal":
                    for row in range(out_a.shape[0]):  # one passage at a time: (n, vocab) stays small
                        lq = F.log_softmax(out_a[row][keep[row]], dim=-1)  # compressed
                        lp = F.log_softmax(out_b[row][keep[row]], dim=-1)  # original
                        kl_sum += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
                        agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
                else:
                    w = mask.unsqueeze(-1).double()  # (b, L, 1)
                    emb_a.append((out_a.double() * w).sum(1) / w.sum(1))  # (b, hidden)
                    emb_b.append((out_b.double() * w).sum(1) / w.sum(1))
    finally:
        model.train(modes[0])
        original.train(modes[1])
    seconds = time.perf_counter() - t0
    common = dict(passages=len(passages), tokens=tokens, seqlen=seqlen, seconds=seconds)
    if kinds == {"causal"}:
        result = FidelityResult(kind="causal", kl=kl_sum / tokens, top1_agreement=agree / tokens, **common)
        logger.info("fidelity: KL %.6f, top-1 agreement %.4f over %d tokens", result.kl, result.top1_agreement,
                    tokens)
        return result
    cosine, neighbours = _embedding_agreement(torch.cat(emb_a), torch.cat(emb_b))
    result = FidelityResult(kind="encoder", cosine=cosine, neighbour_agreement=neighbours, **common)
    logger.info("fidelity: cosine %.6f, neighbour agreement %.4f over %d passages", cosine, neighbours,
                len(passages))
    return result


def _embedding_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean cosine of a[i] and b[i], fraction of i whose nearest other passage agrees); a, b: (n, hidden)."""
    n = a.shape[0]
    if n < 3:
        raise CalibrationError(f"an encoder's neighbour agreement needs at least 3 passages, got {n}; "
                               "add passages to the file (separated by blank lines)")
    cosine = float(F.cosine_similarity(a, b, dim=-1).mean())
    na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    eye = torch.eye(n, dtype=torch.bool)
    nearest_a = (na @ na.T).masked_fill(eye, float("-inf")).argmax(-1)  # (n,)
    nearest_b = (nb @ nb.T).masked_fill(eye, float("-inf")).argmax(-1)
    return cosine, float((nearest_a == nearest_b).double().mean())


def fidelity_to(model: nn.Module, tokenizer: Any, original: str, texts: str | Path, *, dtype: str = "float32",
                device: str | torch.device | None = None, seqlen: int = 512, batch_size: int = 8,
                progress: bool = False) -> FidelityResult:
    """:func:`fidelity` of ``model`` to the model named ``original`` (loaded here, in ``dtype``, with
    :func:`rankdown.loading.load_model`, and moved to ``device`` where ``model`` is), on the
    passages of file ``texts`` (:func:`read_passages`)."""
    from rankdown.loading import load_model

    passages = read_passages(texts)
    reference, _ = load_model(original, dtype)
    if device:
        reference.to(device)
    return fidelity(model, reference, tokenizer, passages, seqlen=seqlen, batch_size=batch_size, progress=progress)
