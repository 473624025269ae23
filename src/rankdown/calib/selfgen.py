"""``--calib self``: the dense model writes its own calibration text.

Rows start from the model's BOS token alone and from a few shipped seed prompts (natural language
and code), each rendered through the tokenizer's chat template when it has one (a user turn and the
generation prompt), otherwise as plain text after BOS. They are sampled (temperature 1, top-p 0.95,
no top-k) in left-padded batches, each batch seeded from ``seed`` and its index, up to ``seqlen`` new
tokens or the end of the turn. Prompt and continuation up to its end token are joined into one
stream and cut into consecutive windows of ``seqlen`` tokens until ``nsamples`` are full: the
statistics see the model's own template tokens and its own distribution of text.

The windows are cached under ``$RANKDOWN_CACHE/calib`` (default ``~/.cache/rankdown/calib``), named
by a hash of the model's content and every setting above, so a second run of the same model and
settings reads them back instead of generating. A model given as a folder (a streamed run) is
fingerprinted from its files and loaded whole only when the text is not cached; it is freed after.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rankdown.calib.sources import CalibrationError

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the way the text is written changes: older cache entries are then not read
TEMPERATURE = 1.0
TOP_P = 0.95
BATCH_SIZE = 8
SEED_PROMPTS = (
    "Tell me about the history of the printing press and how it changed Europe.",
    "Explain how vaccines teach the immune system to recognise a virus.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the advantages and disadvantages of working from home? Give examples.",
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring and tests.",
    "How do I read a CSV file in Python and compute the average of one column?",
    "Write a JavaScript function that debounces another function, and explain how it works.",
    "Explain the difference between a process and a thread, with a small example in C.",
)


def cache_dir() -> Path:
    """``$RANKDOWN_CACHE/calib``, else ``~/.cache/rankdown/calib``."""
    return Path(os.environ.get("RANKDOWN_CACHE") or "~/.cache/rankdown").expanduser() / "calib"


def folder_digest(path: str | os.PathLike) -> str:
    """A fingerprint of the model in a folder from its files, without loading it: config.json and,
    of each safetensors file, its size, its header (names, shapes, dtypes) and 4096 strided
    8-byte samples of its data."""
    folder = Path(path).expanduser()
    h = hashlib.sha1()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, size)))
            step = max(8, size // 4096)
            for offset in range(8 + header, size - 8, step):
                f.seek(offset)
                h.update(f.read(8))
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    text = json.dumps([type(tokenizer).__name__, sorted(vocab.items())[:: max(1, len(vocab) // 2048)], len(vocab),
                       getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id],
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The rows' prompts as token ids: BOS alone, then each seed prompt (through the chat template
    when the tokenizer has one, else after BOS when it has one)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("--calib self needs a tokenizer with a BOS or EOS token to start the model's text "
                               "from; pass --calib reference, prose or a file instead")
    rows = [[int(start)]]
    templated = bool(getattr(tokenizer, "chat_template", None))
    for prompt in SEED_PROMPTS:
        if templated:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            rows.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            rows.append([int(start)] + ids if tokenizer.bos_token_id is not None else ids)
    return rows


def self_calibration(model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0,
                     batch_size: int = BATCH_SIZE, digest: str | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens the model wrote, (nsamples, seqlen) int64.

    ``model``: the dense model in memory, or the path of its folder (it is then fingerprinted from
    its files and loaded only if the windows are not cached). ``digest`` replaces the fingerprint.
    """
    if tokenizer is None:
        raise CalibrationError("--calib self needs the model's tokenizer; pass --calib reference, prose or a file")
    in_memory = isinstance(model, torch.nn.Module)
    if digest is None:
        from rankdown.stats_cache import model_digest

        digest = model_digest(model) if in_memory else folder_digest(model)
    key = {"version": VERSION, "model": digest, "tokenizer": _tokenizer_digest(tokenizer), "nsamples": nsamples,
           "seqlen": seqlen, "seed": seed, "temperature": TEMPERATURE, "top_p": TOP_P, "batch_size": batch_size,
           "prompts": hashlib.sha1(json.dumps(SEED_PROMPTS).encode()).hexdigest()}
    text = json.dumps(key, sort_keys=True)
    path = cache_dir() / f"self-{hashlib.sha1(text.encode()).hexdigest()[:20]}.safetensors"
    cached = _read(path, nsamples, seqlen)
    if cached is not None:
        logger.info("calibration: %d windows of %d tokens the model wrote, from the cache %s", nsamples, seqlen, path)
        return cached
    if in_memory:
        windows = generate_windows(model, tokenizer, nsamples, seqlen, seed, batch_size)
    else:
        from rankdown.loading import load_model

        logger.warning("--calib self: loading the whole model from %s once to write its calibration text "
                       "(cached for later runs)", model)
        loaded, _ = load_model(str(model))
        try:
            windows = generate_windows(loaded, tokenizer, nsamples, seqlen, seed, batch_size)
        finally:
            del loaded
            gc.collect()
    _write(path, windows, text)
    return windows


def generate_windows(model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                     batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Sample text from ``model`` (see the module's docstring) until ``nsamples`` windows of
    ``seqlen`` tokens are full; (nsamples, seqlen) int64. The caller's random state is kept."""
    prompts = prompt_ids(tokenizer)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    need = nsamples * seqlen
    stream: list[int] = []
    device = next(model.parameters()).device
    max_batches = 4 * (-(-nsamples // batch_size)) + 8  # a model that ends every turn at once cannot fill them
    was_training = model.training
    model.eval()
    try:
        for b in range(max_batches):
            if len(stream) >= need:
                break
            rows = [prompts[(b * batch_size + i) % len(prompts)] for i in range(batch_size)]
            stream.extend(_sample_batch(model, rows, seqlen, seed * 100_003 + b, pad, eos, device))
            logger.info("calibration self: %d of %d tokens written", min(len(stream), need), need)
    finally:
        model.train(was_training)
    if len(stream) < need:
        raise CalibrationError(f"--calib self: the model wrote only {len(stream)} tokens in {max_batches} batches, "
                               f"fewer than {nsamples} x {seqlen}; pass --calib reference, prose or a file")
    return torch.tensor(stream[:need], dtype=torch.long).view(nsamples, seqlen)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if value is None:
        value = tokenizer.eos_token_id
    ids = value if isinstance(value, list) else [value]
    ids = [int(i) for i in ids if i is not None]
    if not ids:
        raise CalibrationError("--calib self needs the model's end-of-text token (eos_token_id); "
                               "pass --calib reference, prose or a file")
    return ids


def _sample_batch(model: Any, rows: list[list[int]], new: int, seed: int, pad: int, eos: list[int],
                  device: torch.device) -> list[int]:
    """One left-padded batch sampled ``new`` tokens (or to an end token) per row; the rows' prompts
    and continuations, each up to and including its first end token, joined."""
    from transformers import GenerationConfig

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=new,
                              pad_token_id=pad, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    stream: list[int] = []
    for i, r in enumerate(rows):
        cont = out[i, width:].tolist()
        end = next((j for j, t in enumerate(cont) if t in eos), len(cont) - 1)
        stream.extend(r + cont[: end + 1])
    return stream


def _read(path: Path, nsamples: int, seqlen: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        ids = load_file(path)["input_ids"]
    except Exception as e:  # a damaged cache file is written again, not trusted
        logger.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None
    return ids if tuple(ids.shape) == (nsamples, seqlen) else None


def _write(path: Path, windows: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": windows.contiguous()}, tmp)
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(key + "\n", encoding="utf-8")
    except Exception as e:  # (a full or read-only disk) the text is still used; only the next run pays again
        logger.warning("could not cache the model's calibration text in %s (%s)", path.parent, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
