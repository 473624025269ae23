"""Figures of a dense model kept between runs, so that a grid or a repeated eval measures it once.

A figure (a JSON-able dict: the generation check, HumanEval) is stored under
``$RANKDOWN_CACHE/eval`` (default ``~/.cache/rankdown/eval``) in a file named by a hash of its key:
the model's content digest (:func:`source_digest`), what was measured and every setting it depends
on, and the versions of rankdown, torch and transformers. Files are written beside their name and
renamed; an unreadable one is measured again.

The content digest of a model folder (or a .gguf file) is the SHA-256 of its files' names and
bytes (the weights, config and tokenizer); since hashing gigabytes takes seconds, each file's
digest is remembered under its path, size, modification time and inode, and hashed again only
when one of those changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

FORMAT = 1  # of the stored figures: a change of their fields bumps it, and older entries are measured again
_KEEP = (".json", ".safetensors", ".bin", ".model", ".gguf", ".txt", ".jinja", ".py")


def cache_dir() -> Path:
    """``$RANKDOWN_CACHE/eval``, ``~/.cache/rankdown/eval`` by default."""
    return Path(os.environ.get("RANKDOWN_CACHE") or "~/.cache/rankdown").expanduser().absolute() / "eval"


def _file_digest(path: Path, index: dict[str, Any]) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    known = index.get(str(path))
    if known is not None and known["stamp"] == stamp:
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    index[str(path)] = {"stamp": stamp, "sha256": h.hexdigest()}
    return h.hexdigest()


def source_digest(name: str | None) -> str | None:
    """The content digest of the model ``name`` names: a local folder, a .gguf file or the
    reference model; None for anything else (a hub id: not cached)."""
    from rankdown.loading import is_reference

    if is_reference(name):
        from rankdown.reference import reference_dir

        path = reference_dir()
    else:
        path = Path(str(name)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _KEEP and not p.name.startswith("."))
    else:
        return None
    index_path = cache_dir() / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_digest(p.resolve(), index)}\0".encode())
    try:
        _write_json(index_path, index)
    except OSError as e:  # only the shortcut is lost
        logger.info("could not remember the model digests in %s (%s)", index_path, e)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("rankdown", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_figures(model: str | None, kind: str, settings: dict[str, Any],
                   compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """``compute()``'s figures for the model ``model`` names, from the cache when they were measured
    before with the same content, ``kind`` and ``settings``; returns (figures, whether cached).
    A model without a content digest (a hub id) is measured every time."""
    digest = source_digest(model)
    if digest is None:
        return compute(), False
    key = {"format": FORMAT, "digest": digest, "kind": kind, "settings": settings, "versions": _versions()}
    text = json.dumps(key, sort_keys=True, default=str)
    path = cache_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == json.loads(text):
                logger.info("%s of %s from the cache: %s", kind, model, path)
                return stored["figures"], True
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable cache file %s (%s)", path, e)
    figures = compute()
    try:
        _write_json(path, {"key": json.loads(text), "figures": figures})
    except OSError as e:  # a read-only or full cache costs a second measurement, nothing else
        logger.warning("could not cache %s of %s in %s (%s)", kind, model, path, e)
    return figures, False
