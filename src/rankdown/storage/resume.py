"""Resume: what a killed streaming run finished, kept beside its output, and the store that
replays it (:class:`ResumableStore` wraps a :class:`~rankdown.storage.StreamedModel`, so the
engine never knows a run resumed)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rankdown import distributed
from rankdown.config import ConfigError
from rankdown.storage.folder import StreamedModel
from rankdown.storage.weights import FolderWeights, _sha256, weights_digest

log = logging.getLogger(__name__)


class ResumeMismatchError(ConfigError):
    """A partial run of other settings or inputs sits where this run would write."""


class RunState:
    """What a streaming run has finished, in ``WORK/state.json`` (rewritten atomically)."""

    def __init__(self, work: Path, fingerprint: dict, ranks: dict | None = None, layers: dict | None = None,
                 seconds: float = 0.0):
        self.work, self.fingerprint = work, fingerprint
        self.ranks, self.layers = ranks, dict(layers or {})
        self.earlier = float(seconds)  # seconds the earlier runs of this partial run spent
        self.started = time.monotonic()  # when this run took the state over

    @property
    def seconds(self) -> float:
        """Seconds spent on this partial run so far: the earlier runs' and this one's."""
        return self.earlier + time.monotonic() - self.started

    @classmethod
    def read(cls, work: Path) -> "RunState | None":
        try:
            d = json.loads((work / "state.json").read_text(encoding="utf-8"))
            return cls(work, d["fingerprint"], d.get("ranks"), d.get("layers"), float(d.get("seconds") or 0.0))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def check(self) -> None:
        """Forget each finished layer whose shard is missing, unreadable or changed since it was
        written (its sha256): the resumed run computes it again."""
        from safetensors import safe_open

        for key in sorted(self.layers, key=int):
            shard = self.work / f"layer-{int(key):05d}.safetensors"
            try:
                sha = self.layers[key].get("sha256")
                if sha is not None and _sha256(shard) != sha:
                    raise ValueError("its content changed since it was written")
                with safe_open(shard, "pt") as f:  # a state without checksums: read every tensor
                    for k in f.keys() if sha is None else ():
                        f.get_tensor(k)
            except Exception as e:
                log.warning("%s of the partial run is damaged (%s): layer %s is computed again", shard, e, key)
                del self.layers[key]
        self.save()

    def save(self) -> None:
        if not distributed.is_main():  # under torchrun process 0 keeps the state
            return
        tmp = self.work / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "ranks": self.ranks, "layers": self.layers,
                                   "seconds": round(self.seconds, 3)}), encoding="utf-8")
        os.replace(tmp, self.work / "state.json")


def _fingerprint(
    path: Path, config: Any, batch_size: int, run: Any, calibration: Any, nsamples: int, seqlen: int,
    dtype: torch.dtype, save_dtype: torch.dtype,
) -> dict:
    """Every setting and input that changes the result: the method's config, the run's device,
    seed and batch size (not --max-memory or --stats-cache, which only move data), the calibration
    as its tokens, the model as the content of its files."""
    import rankdown

    if isinstance(calibration, torch.Tensor):
        calib = "tensor:" + hashlib.sha1(calibration.cpu().numpy().tobytes()).hexdigest()
    elif hasattr(calibration, "input_ids"):
        calib = "tokens:" + hashlib.sha1(calibration.input_ids.cpu().numpy().tobytes()
                                         + calibration.attention_mask.cpu().numpy().tobytes()).hexdigest()
    else:  # a method that reads no calibration
        calib = str(calibration)
    return {"model": str(path), "weights": weights_digest(path, FolderWeights(path)),
            **{f"method.{k}": v for k, v in config.to_dict().items()},
            "run.device": run.device, "run.seed": run.seed, "run.batch_size": batch_size, "calibration": calib, "nsamples": nsamples,
            "seqlen": seqlen, "dtype": str(dtype).split(".")[1], "save_dtype": str(save_dtype).split(".")[1],
            "rankdown": rankdown.__version__}


_CHANGED = {"weights": "the model's weights changed (the content of its files)",
            "calibration": "the calibration changed (other tokens: its file or source was changed)"}


def _differences(then: dict, now: dict) -> str:
    keys = sorted(set(then) | set(now), key=str)
    diffs = [_CHANGED.get(k) or f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
             for k in keys if then.get(k) != now.get(k)]
    return "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")


class OutputBusyError(FileExistsError):
    """Another process is writing to the same output folder."""


def _lock(out: Path, work: Path) -> int:
    """Take ``WORK/lock`` (``fcntl.flock``, let go by the system however the process ends) for as
    long as this run writes to ``out``; refuse at once if another process holds it."""
    import fcntl

    while True:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(f"another rankdown run is writing to {out} (pid {pid}): wait for it to end, or "
                                  "choose another --out") from None
        try:  # the run that held it may have removed the folder meanwhile: lock the new one
            same = os.stat(work / "lock").st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _interruption(e: BaseException) -> bool:
    """Whether the same command may succeed where this one stopped: Ctrl-C or SIGTERM (the CLI
    raises KeyboardInterrupt for both), a full disk, no memory left."""
    return (isinstance(e, (KeyboardInterrupt, MemoryError, torch.OutOfMemoryError))
            or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)))


def _after_failure(e: BaseException, work: Path, state: RunState | None, fresh: bool, resumable: bool = True) -> None:
    """Keep the partial run after an interruption (and say so on the exception); else remove it:
    the same command would fail the same way. A partial run this one never took is left alone.
    An interruption always says what was kept, the pre-pass's too (calibration, statistics, plan)."""
    if state is not None and _interruption(e) and (state.layers or state.ranks):
        state.save()  # with the seconds spent until now
        done = (f"finished layers: {len(state.layers)}" if state.layers else
                "its plan (the ranks; no layer finished yet)")
        e.add_note(f"the partial run in {work} is kept ({done}): run the same command again to resume, or add "
                   "--restart to start over")
        return
    if state is not None or fresh:
        shutil.rmtree(work, ignore_errors=True)
    if _interruption(e) and (state is not None or fresh):
        why = ("stopped before the plan was made (calibration, statistics, allocation)" if resumable else
               "this method's streamed runs cannot resume (what one layer hands the next is not saved)")
        e.add_note(f"{why}: nothing was kept, and the same command starts over")


def _open_state(work: Path, fingerprint: dict, resume: bool,
                on_resume: Callable[[int, Path], None] | None = None) -> RunState:
    """The state of the partial run in ``work`` to resume (its damaged layers forgotten), or a new
    one (``work`` emptied but for the lock)."""
    state = RunState.read(work) if resume else None
    if state is not None and state.fingerprint != fingerprint:
        raise ResumeMismatchError(
            f"{work} holds a partial run of other settings or inputs ({_differences(state.fingerprint, fingerprint)}); "
            "resume it with the settings and inputs it began with, or pass --restart to discard it and start over")
    if state is not None and (state.layers or state.ranks):
        state.check()
        log.info("resuming the partial run in %s: %d layers done", work, len(state.layers))
        if on_resume is not None:
            on_resume(len(state.layers), work)
        return state
    for entry in work.iterdir():
        if entry.name != "lock":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    state = RunState(work, fingerprint)
    state.save()
    return state


class ResumableStore:
    """A :class:`~rankdown.storage.StreamedModel` that skips what ``state`` says an earlier run
    finished: such a layer is read back from its shard with its records, and every newly written
    layer is recorded in ``state`` (after its shard: a kill in between redoes the layer)."""

    streams = True

    def __init__(self, inner: StreamedModel, state: RunState) -> None:
        self.inner, self.state = inner, state

    def begin(self, device: torch.device) -> None:
        self.inner.begin(device)

    def end(self) -> None:
        self.inner.end()

    def load_outside(self, head: bool = False) -> None:
        self.inner.load_outside(head)

    def drop_outside(self) -> None:
        self.inner.drop_outside()

    def digest(self) -> str:
        return self.inner.digest()

    def check_finite(self, progress: bool = False) -> None:
        self.inner.check_finite(progress)

    def plan(self, make: Callable[[], dict[str, int]]) -> dict[str, int]:
        """The ranks the run began with when it resumes, else ``make()`` (kept for a later resume)."""
        if self.state.ranks is not None:
            return self.state.ranks
        ranks = make()
        self.state.ranks = dict(ranks)
        self.state.save()
        return ranks

    def load(self, i: int, layer: nn.Module) -> dict | None:
        done = self.state.layers.get(str(i))
        if done is None:
            return self.inner.load(i, layer)
        self.inner.load_written(i, layer, done["modules"])  # the compressed layer, as the killed run wrote it
        return done

    def commit(self, i: int, layer: nn.Module, records: dict | None) -> None:
        if str(i) in self.state.layers:  # written by the earlier run
            records = None
        self.inner.commit(i, layer, records)
        if records is not None and distributed.is_main():
            self.state.layers[str(i)] = {**records, "sha256": self.inner.written[i]}
            self.state.save()
