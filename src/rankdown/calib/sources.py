"""Where calibration and evaluation text comes from: Hub corpora, the reference texts, local files.

A *source* is one of the names in ``SOURCE_NAMES`` or a path to a local file:

* ``wikitext2``, ``c4``, ``ptb``: the corpora of the compression papers, fetched with
  :func:`datasets.load_dataset` (network or the local datasets cache);
* ``reference`` / ``reference-heldout``: the calibration / held-out text of rankdown's embedded
  reference model (Python code), shipped inside the package;
* ``prose`` / ``prose-heldout``: English prose that ships with this machine's Python (the reference
  manual's topics of ``pydoc_data``, code examples left out), in two disjoint halves;
* ``self``: text the dense model writes itself (calibration only, see :mod:`.selfgen`);
* ``A,B``: a mixture, windows drawn from each source in equal shares (see :mod:`.sampling`);
* ``*.jsonl`` (one JSON object per line) or ``*.json`` (a JSON list of objects): records with a
  ``text`` string or chat ``messages`` (a list of ``{"role", "content"}``);
* any other existing file: its whole UTF-8 text is one document.

Every problem with a source that the user can fix raises :class:`CalibrationError`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import re
import socket
from urllib.parse import urlparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

SOURCE_NAMES = ("wikitext2", "c4", "ptb", "reference", "reference-heldout", "prose", "prose-heldout", "self")
SELF = "self"
RECORD_SUFFIXES = (".jsonl", ".json")
_ACCEPTED = (f"one of {', '.join(SOURCE_NAMES)}, a path to a .txt or .jsonl file, or several joined by commas "
             "(e.g. self,reference)")
OFFLINE_CALIB = ("--calib reference (Python code), --calib prose (English documentation), --calib self (text "
                 "the model writes) or a file (--calib path/to/text.txt or .jsonl)")
OFFLINE_PPL = "--ppl reference-heldout (Python code), --ppl prose-heldout (English documentation) or a file"


class CalibrationError(ValueError):
    """A calibration or evaluation source cannot be used (missing, empty, malformed, too short)."""


@dataclass(frozen=True)
class _HubCorpus:
    """How one paper corpus is fetched: ``load_dataset(path, name, data_files=..., split=...)``."""

    path: str
    name: str | None
    field: str
    splits: dict[str, str]  # rankdown split ("train", "test", "validation") -> the dataset's split
    data_files: dict[str, str] | None = None
    max_documents: dict[str, int] | None = None  # cap per dataset split (None: every document)


# c4's shards are large (356k documents in train shard 0): calibration keeps the first 5000
# documents (about 3M tokens, ten times 128 x 2048) and evaluation the first 1100 validation
# documents, the subset of the GPTQ / SparseGPT evaluation code.
_HUB: dict[str, _HubCorpus] = {
    "wikitext2": _HubCorpus(
        "wikitext", "wikitext-2-raw-v1", "text",
        {"train": "train", "validation": "validation", "test": "test"},
    ),
    "c4": _HubCorpus(
        "allenai/c4", None, "text", {"train": "train", "validation": "validation", "test": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_documents={"train": 5000, "validation": 1100},
    ),
    "ptb": _HubCorpus(
        "ptb_text_only", "penn_treebank", "sentence",
        {"train": "train", "validation": "validation", "test": "test"},
    ),
}


def is_record_source(source: str) -> bool:
    """Whether ``source`` names a file of records (``.jsonl`` / ``.json``) rather than plain text."""
    return source not in SOURCE_NAMES and Path(source).suffix.lower() in RECORD_SUFFIXES


def mixture_parts(source: str) -> list[str]:
    """The sources of a mixture ``"A,B"`` (a single source: itself). A file whose name holds a
    comma is one source."""
    if "," not in source or Path(source).expanduser().is_file():
        return [source]
    parts = [p.strip() for p in source.split(",")]
    if any(not p for p in parts):
        raise CalibrationError(f"{source!r} names an empty source between commas; pass e.g. self,reference")
    return parts


def load_texts(source: str, split: str | None = None) -> list[str]:
    """The documents of ``source``, in order; joining them with ``"\\n\\n"`` gives its whole text.

    ``split`` selects the part of a Hub corpus: ``None`` means ``"train"`` (calibration),
    perplexity passes ``"test"`` (c4 has no test split: its validation shard is used). Local files
    and the reference texts have no splits and ignore it. A ``.txt`` file or reference text is one
    document; wikitext2 yields its lines, empty ones included (joined as the papers join them).
    Records of a ``.jsonl`` file become their ``text``, or their messages as ``"role: content"``
    lines (use :func:`rankdown.calib.sampling.render_record` to apply a tokenizer's chat template).
    """
    if source in _HUB:
        return _load_hub(source, split or "train")
    if source in ("reference", "reference-heldout"):
        return [_read_text(_reference_path(source), source)]
    if source in ("prose", "prose-heldout"):
        return prose_documents(heldout=source == "prose-heldout")
    if source == SELF or len(mixture_parts(source)) > 1:
        raise CalibrationError(f"{source!r} is a calibration source only (text the model writes, or a mixture); "
                               f"to evaluate, pass {OFFLINE_PPL}")
    if is_record_source(source):
        return [_render_plain(r) for r in load_records(source)]
    return [_read_text(_local_path(source), source)]


def load_records(source: str) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` (one JSON object per line) or ``.json`` (a list) file.

    Each record is a dict with a non-empty ``text`` string or a non-empty ``messages`` list of
    ``{"role": str, "content": str}``; blank lines are skipped. Any other line or item raises
    :class:`CalibrationError` naming its line number (item number for ``.json``).
    """
    path = _local_path(source)
    raw = _read_text(path, source)
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CalibrationError(
                f"{path}: not valid JSON ({e}); a .json source must be a list of objects like "
                '{"text": ...}, or use .jsonl with one object per line'
            ) from e
        if not isinstance(items, list):
            raise CalibrationError(f"{path}: a .json source must hold a JSON list of records, "
                                   f"found {type(items).__name__}; wrap the records in [...]")
        records = [_check_record(item, f"{path} item {i}") for i, item in enumerate(items, 1)]
    else:
        records = _parse_jsonl(raw, path)
    if not records:
        raise CalibrationError(f"{path} holds no records; add records like {{\"text\": \"...\"}}")
    return records


def _parse_jsonl(raw: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(raw.split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(
                f"{path} line {lineno}: not valid JSON ({e.msg}); each line of a .jsonl file must be "
                'one JSON object like {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}'
            ) from e
        records.append(_check_record(item, f"{path} line {lineno}"))
    return records


def _check_record(item: Any, where: str) -> dict[str, Any]:
    fix = 'give it a non-empty "text" string or a "messages" list of {"role": ..., "content": ...}'
    if not isinstance(item, dict):
        raise CalibrationError(f"{where}: expected a JSON object, found {type(item).__name__}; {fix}")
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise CalibrationError(f'{where}: "text" must be a non-empty string; {fix}')
        return item
    if "messages" in item:
        msgs = item["messages"]
        ok = isinstance(msgs, list) and len(msgs) > 0 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok:
            raise CalibrationError(f'{where}: "messages" must be a non-empty list of objects with '
                                   f'string "role" and "content"; {fix}')
        return item
    raise CalibrationError(f'{where}: the record has neither a "text" nor a "messages" field '
                           f"(it has {sorted(item)}); {fix}")


def _render_plain(record: dict[str, Any]) -> str:
    """A record as text without a tokenizer: its ``text``, or ``"role: content"`` lines."""
    if "text" in record:
        return record["text"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def _reference_path(source: str) -> Path:
    name = "calib.txt" if source == "reference" else "heldout.txt"
    path = Path(str(importlib.resources.files("rankdown") / "reference" / name))
    if not path.is_file():
        raise CalibrationError(f"the reference text {path} is missing from this installation; "
                               "reinstall rankdown, or pass a local file (e.g. --calib path/to/text.txt)")
    return path


def check_source(source: str) -> None:
    """Fail fast on a source that cannot be read: an unknown name, a missing or unreadable file,
    each part of a mixture (the Hub corpora are only fetched when used)."""
    for part in mixture_parts(source):
        if part not in SOURCE_NAMES:
            _local_path(part)


# ----------------------------------------------------------------------------- prose
_RULE = re.compile(r"\s*[*=\-^~\"]{3,}\s*")  # a heading's underline


def _prose(text: str, seen: set[str]) -> str:
    """A topic of the reference manual without its code: paragraphs whose every line is indented
    (examples, grammar) or that open with an interpreter prompt are dropped, headings' underlines, and
    paragraphs ``seen`` in an earlier topic (``compound`` repeats ``if``, ``try``, ...)."""
    kept = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip() and not _RULE.fullmatch(ln)]
        code = lines and (lines[0].lstrip().startswith(">>>") or all(ln.startswith("   ") for ln in lines))
        if lines and not code:
            body = "\n".join(lines)
            if body.strip() not in seen:
                seen.add(body.strip())
                kept.append(body)
    return "\n\n".join(kept)


def prose_documents(heldout: bool = False) -> list[str]:
    """The ``prose`` (or ``prose-heldout``) documents: the Python reference manual's topics as text
    (``pydoc_data.topics``, shipped with Python; about 250 kB of English without the code examples or
    the paragraphs that topics repeat),
    split in two disjoint halves of about equal size: in the order of their names, each topic goes to
    the half that holds less text so far. The text is that of this machine's Python version."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a Python installed without its documentation data
        raise CalibrationError(f"this Python has no pydoc_data ({e}), the text of the prose sources; "
                               "pass --calib reference or a file instead") from e
    halves: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    seen: set[str] = set()
    for name in sorted(topics):
        text = _prose(topics[name], seen)
        if not text:
            continue
        half = 0 if sizes[0] <= sizes[1] else 1
        halves[half].append(text)
        sizes[half] += len(text)
    return halves[1 if heldout else 0]


def _local_path(source: str) -> Path:
    if not str(source).strip():
        raise CalibrationError(f"no source given (an empty name); pass {_ACCEPTED}")
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise CalibrationError(f"{source} is not a file; pass a .txt or .jsonl file, or {_ACCEPTED}")
    looks_like_path = any(c in source for c in "/\\.") or path.suffix != ""
    if looks_like_path:
        raise CalibrationError(f"calibration file {source} does not exist; check the path, "
                               f"or pass {_ACCEPTED}")
    raise CalibrationError(f"unknown calibration source {source!r}; pass {_ACCEPTED}")


def _read_text(path: Path, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               "convert it to UTF-8 or pass another file") from e
    except OSError as e:
        raise CalibrationError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
    if not text.strip():
        where = str(path) if str(path) == source else f"{source} ({path})"
        raise CalibrationError(f"{where} is empty or only whitespace; give a file with text in it")
    return text


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds (one try; a
    proxy set in the environment is trusted). ``datasets`` retries for about 25 s before it fails."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_by_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_hub(source: str, split: str) -> list[str]:
    corpus = _HUB[source]
    if split not in corpus.splits:
        raise CalibrationError(f"{source} has no split {split!r}; use one of {sorted(corpus.splits)}")
    hub_split = corpus.splits[split]
    choices = OFFLINE_CALIB if split == "train" else OFFLINE_PPL
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(f"loading {source} needs the 'datasets' package ({e}); pip install "
                               f"datasets, or pass {choices}") from e
    offline = _offline_by_env() or not hub_reachable()
    try:
        kwargs: dict[str, Any] = {"split": hub_split}
        if corpus.data_files is not None:
            kwargs["data_files"] = {hub_split: corpus.data_files[hub_split]}
        with _offline_mode(offline):  # offline: the local datasets cache at once, no retries
            ds = datasets.load_dataset(corpus.path, corpus.name, **kwargs)
        column = ds[corpus.field]
        limit = (corpus.max_documents or {}).get(hub_split, len(column))
        docs = list(column[: min(limit, len(column))])
    except Exception as e:  # network, hub, cache and format errors all mean: this corpus is unavailable
        if offline:
            raise CalibrationError(f"{source} is not in the local datasets cache and the Hugging Face Hub cannot be "
                                   f"reached (offline); offline, pass {choices}") from e
        brief = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        raise CalibrationError(
            f"could not fetch the {source} dataset ({corpus.path}, split {hub_split}) from the "
            f"Hugging Face Hub or the local datasets cache ({brief}); pass {choices}"
        ) from e
    if not any(isinstance(d, str) and d.strip() for d in docs):
        raise CalibrationError(f"the {source} dataset split {hub_split} has no text; pass {choices}")
    logger.info("loaded %d documents of %s (%s)", len(docs), source, hub_split)
    return [d if isinstance(d, str) else "" for d in docs]


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """While inside, ``datasets`` reads only its local cache when ``offline`` (as if
    HF_DATASETS_OFFLINE=1 had been set before it was imported); its settings are restored after."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
