"""Observers: what a pass over a layer's calibration batches accumulates, one object per linear in
the shape of GPTQ's ``add_batch(inp, out)``, and their sum over the processes in one place
(:func:`merge`). Statistics are float64 :class:`~rankdown.stats.InputStats`; padding rows are left
out (the batch's mask, given by :meth:`start`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rankdown import distributed
from rankdown.stats import InputStats


def _real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (b, L, d) at real tokens of ``mask`` (b, L) (all of them without one)."""
    return x[mask] if mask is not None and x.shape[:-1] == mask.shape else x


class Observer:
    """Accumulates over the batches of one pass; :func:`merge` sums :meth:`statistics` over the processes."""

    def start(self, mask: torch.Tensor | None) -> None:
        """A new batch begins; ``mask`` (b, L) bool of its real tokens, None when all are real."""
        self.mask = mask

    def statistics(self) -> list[InputStats]:
        return []

    def totals(self) -> list[float]:
        return []

    def merged(self, totals: list[float]) -> None:
        """The sums of :meth:`totals` over the processes."""


class SharedInputs:
    """Linears fed the same tensor (q, k, v) share one :class:`InputStats`, found by the tensor's
    identity within a batch. ``same``: all the linears are of one group, which shares its input by
    definition: the first one's input stands for all (the forward need not run gate to reach up)."""

    def __init__(self, device: torch.device, gram: bool, same: bool) -> None:
        self.device, self.gram, self.same = device, gram, same
        self.members: list["InputObserver"] = []
        self._by_id: dict[int, tuple[torch.Tensor, InputStats]] = {}

    def start(self) -> None:
        """A new batch: no tensor of it seen yet."""
        self._by_id.clear()

    def add(self, obs: "InputObserver", x: torch.Tensor) -> list[str]:
        """Add ``x`` to ``obs``'s statistics unless it was added already; the names now observed."""
        hit = self._by_id.get(id(x))
        if hit is not None and hit[0] is x:
            obs.stats = hit[1]
        else:
            s = obs.stats or InputStats(x.shape[-1], self.device, self.gram)
            s.add(_real(x, obs.mask))
            obs.stats = self._by_id.setdefault(id(x), (x, s))[1]
        if not self.same:
            return [obs.name]
        for other in self.members:
            if other.stats is None:
                other.stats = obs.stats
        return [o.name for o in self.members]


class InputObserver(Observer):
    """Float64 statistics of the inputs of linear ``name`` (``in_features`` wide)."""

    def __init__(self, name: str, in_features: int, shared: SharedInputs) -> None:
        self.name, self.in_features, self.shared = name, in_features, shared
        self.stats: InputStats | None = None
        self.mask = None
        shared.members.append(self)

    def start(self, mask: torch.Tensor | None) -> None:
        super().start(mask)
        self.shared.start()

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> list[str]:
        return self.shared.add(self, inp)

    def statistics(self) -> list[InputStats]:
        if self.stats is None:  # it saw no token (an expert never routed to): empty statistics
            self.stats = InputStats(self.in_features, self.shared.device, self.shared.gram)
        return [self.stats]


class OutputObserver(Observer):
    """Float64 statistics of a linear's outputs ``W x``, its bias left out: ``gram`` is
    ``C_out = Σ (Wx)(Wx)ᵀ`` (out, out)."""

    def __init__(self, name: str, linear: nn.Module, device: torch.device) -> None:
        self.name, self.linear = name, linear
        self.stats = InputStats(linear.out_features, device, True)
        self.mask = None

    def add_batch(self, inp: torch.Tensor | None, out: torch.Tensor) -> list[str]:
        # promoted to float64 by the statistics a block of rows at a time, not whole here
        self.stats.add(_real(out, self.mask), shift=getattr(self.linear, "bias", None))
        return [self.name]

    def statistics(self) -> list[InputStats]:
        return [self.stats]


class ScalarSum(Observer):
    """Sums of a few numbers over the batches (a mean's numerator and count)."""

    def __init__(self, size: int) -> None:
        self.values = [0.0] * size
        self.mask = None

    def add(self, *values: float) -> None:
        self.values = [a + b for a, b in zip(self.values, values)]

    def totals(self) -> list[float]:
        return self.values

    def merged(self, totals: list[float]) -> None:
        self.values = totals


def merge(observers: Sequence[Observer]) -> None:
    """Sum what every observer accumulated over the processes under torchrun, in place, in the
    given order (the same on every process): the only place the engine's passes communicate."""
    stats = [s for o in observers for s in o.statistics()]
    if stats:
        distributed.all_reduce_stats(stats)
    for o in observers:
        if o.totals():
            o.merged(distributed.all_sum(o.totals()))
