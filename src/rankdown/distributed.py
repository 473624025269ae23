"""Several processes, one compression: ``torchrun --nproc-per-node N -m rankdown.cli compress ...``.

Every process runs the whole layer loop, on its own share of the calibration batches (batch ``b``
goes to process ``b % N``), and every statistic is summed over the processes before a method reads
it. The sums are sums of the same rows a single process would see, so every process computes the
same compressed model as one process on all the batches, up to float rounding; process 0 alone
writes. Each layer's outputs stay with the process that computed them: no activation is ever sent.

With ``--device cuda`` process ``i`` computes on ``cuda:LOCAL_RANK`` and the sums go through NCCL;
on the CPU through gloo. Without torchrun (no ``WORLD_SIZE`` above 1 in the environment) nothing
here communicates and every function is the one-process identity. A process group that a caller
initialised already is used as it is.
"""

from __future__ import annotations

import os
import pickle
import zlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from rankdown.config import ConfigError

if TYPE_CHECKING:
    from rankdown.stats import InputStats

T = TypeVar("T")

TIMEOUT_ENV = "RANKDOWN_DIST_TIMEOUT"  # seconds a process waits for the others (default 30 minutes)


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number: start rankdown with "
                          "torchrun") from None


def check_device(device: str | torch.device | None) -> None:
    """A :class:`ConfigError` for a device string torch does not know, one that holds no data (meta),
    or a CUDA device this machine does not have."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N "
                          "(e.g. --device cuda:0)") from None
    if dev.type == "mps" and torch.backends.mps.is_available():  # Apple GPUs, where torch has them
        return
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device} cannot run rankdown: give cpu, cuda or cuda:N"
                          + (" (meta tensors hold no data)" if dev.type == "meta" else ""))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but this machine has no CUDA GPU that torch can use "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; give one of them")


def local_device(device: str | torch.device) -> torch.device:
    """The device this process computes on: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type != "cuda" or _env_world() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.index is not None and device.index != local:
        raise ConfigError(f"--device {device} under torchrun: give --device cuda, and process {local} on each "
                          "machine uses cuda:LOCAL_RANK (one GPU per process)")
    return torch.device("cuda", local)


def setup(device: str | torch.device = "cpu", timeout: float | None = None) -> torch.device:
    """Join the process group torchrun describes (once; gloo on the CPU, NCCL on CUDA) and return
    the device this process computes on. ``timeout``: seconds a process waits for the others, at
    start and at every exchange (default ``$RANKDOWN_DIST_TIMEOUT`` or 1800); a process that never
    comes is a :class:`ConfigError` after it, never a hang."""
    check_device(device)
    dev = local_device(device)
    if _env_world() <= 1 or dist.is_initialized():
        return dev
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, "1800"))
    if dev.type == "cuda":
        if not torch.cuda.is_available() or dev.index >= torch.cuda.device_count():
            raise ConfigError(f"process {os.environ.get('RANK')} wants {dev} but this machine has "
                              f"{torch.cuda.device_count()} GPUs: start at most that many processes per machine")
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # DistStoreError and friends are RuntimeErrors
        raise ConfigError(
            f"could not join the group of {_env_world()} processes ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "start every process with torchrun (torchrun --nproc-per-node N -m rankdown.cli compress ...)") from None
    return dev


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is the one that writes, logs and prints (process 0, or the only one)."""
    return rank() == 0


def shard(batches: Sequence[T]) -> list[T]:
    """This process's calibration batches: batch ``b`` goes to process ``b % world``."""
    n, w = len(batches), world()
    if n < w:
        raise ConfigError(
            f"the calibration set makes {n} batch{'es' if n != 1 else ''} for {w} processes, and every process needs "
            f"at least one: give at least {w} x --batch-size calibration windows (--nsamples), a smaller "
            "--batch-size, or start fewer processes")
    return list(batches[rank()::w])


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same(what: str, layout: str) -> None:
    """Raise on every process when ``layout`` (a description of what is about to be exchanged)
    differs between processes: exchanging mismatched tensors would mix up or hang."""
    if world() == 1:
        return
    sig = zlib.crc32(layout.encode())
    t = torch.tensor([sig, -sig], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"{what} differ between processes ({layout}): the processes run different code or data")


def all_reduce_stats(stats: Sequence["InputStats"]) -> None:
    """Sum ``n``, ``sum``, ``abs_sum`` and ``gram`` of each statistics object over the processes, in
    place, in the given order (the same on every process); an object listed twice is summed once."""
    if world() == 1:
        return
    distinct = list({id(s): s for s in stats}.values())
    check_same("statistics", ";".join(f"{s.dim},{s.gram is not None}" for s in distinct))
    dev = _comm_device()
    for s in distinct:
        head = torch.cat([s.sum, s.abs_sum, torch.tensor([float(s.n)], dtype=torch.float64, device=s.sum.device)])
        head = head.to(dev)
        dist.all_reduce(head)
        s.sum.copy_(head[: s.dim])
        s.abs_sum.copy_(head[s.dim : 2 * s.dim])
        s.n = int(round(float(head[-1])))
        if s.gram is not None:
            all_sum_(s.gram)


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes, in place (through the exchange device and back when they differ)."""
    if world() == 1:
        return t
    dev = _comm_device()
    if t.device == dev:
        dist.all_reduce(t)
    else:
        moved = t.to(dev)
        dist.all_reduce(moved)
        t.copy_(moved)
    return t


def mean_gradients(params: Sequence[torch.Tensor], loss: float | None, tokens: int) -> float:
    """Replace every process's gradients of ``params`` by their mean over the processes, weighted by
    the real tokens of each process's batch (0 for a process without a batch this step), in one
    exchange; returns the weighted mean loss. So a step under torchrun is the step of one process on
    the union of the processes' batches: N processes at ``batch_size`` train as one at ``N x batch_size``."""
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    extra = torch.tensor([(loss or 0.0) * tokens, float(tokens)], dtype=grads[0].dtype, device=grads[0].device)
    flat = all_sum_(torch.cat([g * tokens for g in grads] + [extra]))
    total = max(float(flat[-1]), 1.0)  # no real token anywhere this step: no update
    offset = 0
    for p in params:
        p.grad = (flat[offset : offset + p.numel()] / total).view_as(p).clone()
        offset += p.numel()
    return float(flat[-2]) / total


def all_sum(values: Sequence[float]) -> list[float]:
    """The sums over the processes of some numbers (float64)."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int) -> int:
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return int(t)


def broadcast(obj: Any) -> Any:
    """Process 0's ``obj`` (any picklable value) on every process."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def shutdown() -> None:
    """Leave the process group (the command line does, at its end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def from_main(get: Callable[[Callable[[], T]], T], compute: Callable[[], T]) -> T:
    """``get(compute)`` on process 0, where ``get`` may answer without calling ``compute`` (a cache
    hit): the other processes join ``compute`` (which exchanges statistics) exactly when process 0
    calls it, and receive process 0's answer otherwise. So a cache seen by process 0 alone is enough,
    and only process 0 writes it."""
    if world() == 1:
        return get(compute)
    if not is_main():
        return compute() if broadcast(None) else broadcast(None)
    called = []

    def announced() -> T:
        called.append(True)
        broadcast(True)
        return compute()

    value = get(announced)
    if not called:
        broadcast(False)
        broadcast(value)
    return value


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by process 0 alone (it may write), its value handed to every process; its error
    raised on every process, so a refusal ends all of them at once instead of leaving them waiting."""
    if world() == 1:
        return fn()
    if not is_main():
        ok, value = broadcast(None)
        if not ok:
            raise value
        return value
    try:
        value = fn()
    except Exception as e:
        try:
            pickle.dumps(e)
            sent: Exception = e
        except Exception:  # an error that cannot travel still ends the others
            sent = RuntimeError(f"process 0 failed: {e!r}")
        broadcast((False, sent))
        raise
    broadcast((True, value))
    return value
