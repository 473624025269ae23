"""The output folder: refused before any work when it is taken, is (or holds, or is inside) the
input, or cannot be written; what a killed save left beside it; a write error that means a full,
read-only or unwritable place."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("rankdown.io")


class OutputExistsError(FileExistsError):
    """The output folder cannot be written: it holds files, or it is (or holds, or is inside) the input."""


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EPERM})


def as_disk_error(e: BaseException) -> OSError | None:
    """``e`` as the OSError of a full, read-only or unwritable place, else None. (safetensors reports
    its write failures as a SafetensorError ending in "(os error 28)".)"""
    if isinstance(e, OSError):
        return e if e.errno in DISK_ERRNOS else None
    found = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    if found is None or int(found.group(1)) not in DISK_ERRNOS:
        return None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1))))


def check_writable(out_dir: str | os.PathLike) -> None:
    """Fail before any work when ``out_dir`` cannot be created or written (its nearest existing
    ancestor is a file, or not writable)."""
    import errno

    p = Path(out_dir).expanduser().absolute()
    anc = p if p.exists() else next(a for a in p.parents if a.exists())
    if not anc.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{anc} is a file, so {p} cannot be created", str(p))
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{anc} is not writable", str(p))


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: Any = ()) -> None:
    """Refuse an output folder that is a file, is or holds or lies inside an input, or holds files
    (with ``overwrite``: files other than a model folder rankdown saved)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is a file, not a folder; choose another --out")
    out = out_dir.expanduser().resolve()
    for given in inputs:
        src = Path(given).expanduser().resolve()
        how = ("is the input model" if out == src else "holds the input model" if out in src.parents
               else "is inside the input model folder" if src in out.parents else None)
        if how:
            raise OutputExistsError(f"--out {out_dir} {how} {src}: writing there would replace or mix with the "
                                    "original; choose an --out outside the input")
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out_dir} already exists and is not empty; choose another --out or pass --overwrite to replace it"
        )
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())
    try:
        record = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))["rankdown"]
    except (OSError, ValueError, KeyError, TypeError):
        record = None
    if isinstance(record, dict) and "files" not in record:
        raise OutputExistsError(
            f"{out_dir} was saved by an older rankdown, which did not list the folder's files, so --overwrite cannot "
            "tell them from files of yours; remove the folder yourself, or choose another --out")
    foreign = [n for n in names if not isinstance(record, dict) or n not in record["files"]]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputExistsError(
            f"{out_dir} holds {', '.join(foreign[:3])}{more}, which rankdown did not write there: --overwrite "
            "replaces only a model folder that rankdown saved; choose another --out, or move those files away")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(out_dir: Path) -> None:
    """Remove what a killed save to ``out_dir`` left beside it: ``.OUT.tmp-PID`` (a half-written
    folder) and ``.OUT.old-PID`` (the folder it was replacing: put back if ``out_dir`` is missing),
    for processes that no longer run."""
    import glob

    for left in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*")):
        kind, _, pid = left.name[len(out_dir.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            logger.warning("putting back %s, which a killed run had moved aside to %s", out_dir, left)
            os.replace(left, out_dir)
        else:
            logger.info("removing %s, left by a killed run (process %s)", left, pid)
            shutil.rmtree(left, ignore_errors=True)
