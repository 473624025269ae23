"""Where calibration and evaluation text comes from: Hub corpora, the reference texts, local files.

A *source* is one of the names in ``SOURCE_NAMES`` or a path to a local file:

* ``wikitext2``, ``c4``, ``ptb``: the corpora of the compression papers, fetched with
  :func:`datasets.load_dataset` (network or the local datasets cache);
* ``reference`` / ``reference-heldout``: the calibration / held-out text of rankdown's embedded
  reference model, shipped inside the package;
* ``*.jsonl`` (one JSON object per line) or ``*.json`` (a JSON list of objects): records with a
  ``text`` string or chat ``messages`` (a list of ``{"role", "content"}``);
* any other existing file: its whole UTF-8 text is one document.

Every problem with a source that the user can fix raises :class:`CalibrationError`.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_NAMES = ("wikitext2", "c4", "ptb", "reference", "reference-heldout")
RECORD_SUFFIXES = (".jsonl", ".json")
_ACCEPTED = f"one of {', '.join(SOURCE_NAMES)}, or a path to a .txt or .jsonl file"


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
    """Fail fast on a source that cannot be read: an unknown name, a missing or unreadable file
    (the Hub corpora are only fetched when used)."""
    if source in SOURCE_NAMES:
        return
    _local_path(source)


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


def _load_hub(source: str, split: str) -> list[str]:
    corpus = _HUB[source]
    if split not in corpus.splits:
        raise CalibrationError(f"{source} has no split {split!r}; use one of {sorted(corpus.splits)}")
    hub_split = corpus.splits[split]
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(f"loading {source} needs the 'datasets' package ({e}); pip install "
                               "datasets, or pass a local file (e.g. --calib path/to/text.txt)") from e
    try:
        kwargs: dict[str, Any] = {"split": hub_split}
        if corpus.data_files is not None:
            kwargs["data_files"] = {hub_split: corpus.data_files[hub_split]}
        ds = datasets.load_dataset(corpus.path, corpus.name, **kwargs)
        column = ds[corpus.field]
        limit = (corpus.max_documents or {}).get(hub_split, len(column))
        docs = list(column[: min(limit, len(column))])
    except Exception as e:  # network, hub, cache and format errors all mean: this corpus is unavailable
        brief = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        raise CalibrationError(
            f"could not fetch the {source} dataset ({corpus.path}, split {hub_split}) from the "
            f"Hugging Face Hub or the local datasets cache: no network or the hub is unreachable "
            f"({brief}). Pass a local file instead, e.g. --calib path/to/text.txt or "
            f"path/to/data.jsonl, or the built-in 'reference' text"
        ) from e
    if not any(isinstance(d, str) and d.strip() for d in docs):
        raise CalibrationError(f"the {source} dataset split {hub_split} has no text; "
                               "pass a local file instead (e.g. --calib path/to/text.txt)")
    logger.info("loaded %d documents of %s (%s)", len(docs), source, hub_split)
    return [d if isinstance(d, str) else "" for d in docs]
