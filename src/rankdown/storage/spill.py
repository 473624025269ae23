"""Activations that go to disk beyond a memory budget (``--max-memory``).

The layer loop keeps, per calibration batch, the hidden states entering the current layer (and
Lillama its teacher's). For a big model and many calibration tokens these outweigh one layer's
weights: 128 windows × 2048 tokens × 8192 hidden in float32 is 8.6 GB. A :class:`TensorStore`
holds such a list in RAM while a shared :class:`MemoryBudget` allows, and writes the rest to files
in a temporary folder, read back memory-mapped on access. The values are bit-identical either way.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"4GB"`` -> 4_000_000_000, ``"512MiB"`` -> 536_870_912, ``"0"`` -> 0, None -> None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write e.g. 8GB, 512MiB or 0 (everything on disk)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class MemoryBudget:
    """Bytes of activations allowed in RAM, shared by every store of one run (None: no limit)."""

    def __init__(self, limit: int | None = None, folder: str | Path | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.spilled = 0  # bytes written to disk so far (for reports)
        self._parent = folder
        self._dir: Path | None = None

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of RAM; False when that would pass the limit (the caller spills)."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes

    def folder(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rankdown-spill-", dir=self._parent))
        return self._dir

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "MemoryBudget":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


class TensorStore:
    """A list of CPU tensors kept in RAM within ``budget``, on disk beyond it.

    ``store[i]`` gives the tensor back (memory-mapped when it is on disk: treat it as read-only).
    """

    _count = 0

    def __init__(self, budget: MemoryBudget | None = None, tensors=()) -> None:
        self.budget = budget or MemoryBudget()
        self._items: list[torch.Tensor | Path] = []
        self._ram = 0
        TensorStore._count += 1
        self._name = f"s{TensorStore._count}"
        for t in tensors:
            self.append(t)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        nbytes = t.numel() * t.element_size()
        if self.budget.take(nbytes):
            self._items.append(t)
            self._ram += nbytes
            return
        path = self.budget.folder() / f"{self._name}-{len(self._items)}.pt"
        torch.save(t.contiguous(), path)
        self.budget.spilled += nbytes
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, Path):
            return torch.load(item, mmap=True, weights_only=True)
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    @property
    def on_disk(self) -> int:
        return sum(isinstance(x, Path) for x in self._items)

    def clear(self) -> None:
        """Free the RAM and delete the files of this store."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items.clear()
        self.budget.give(self._ram)
        self._ram = 0
