"""Replay: a later pass over a layer computes a module from the recorded inputs of its last linear
instead of running it (the attention's o, the MLP's down), so the sequential loop runs the
attention once per layer, not once per group. An optional runner of
:meth:`rankdown.engine.LayerContext.collect` (``replay=True``)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rankdown.storage import MemoryBudget, TensorStore

log = logging.getLogger(__name__)


@dataclass
class _Replay:
    """The recorded inputs of a linear ``last`` that is the last operation of its parent module.

    While nothing before it in the layer changes, the parent's output on batch ``b`` is
    ``last(store[b])`` (with ``last`` as it is now: compressed or not), so a pass can skip running
    the parent: its ``forward`` is swapped for :meth:`stub`. Whether ``last`` really ends its parent
    is checked on the first batch of the pass that records it, against the parent's real output;
    ``extra`` is the number of further (None) entries of the parent's output tuple, -1 for a tensor.
    """

    last: str
    group: int
    store: TensorStore
    extra: int

    @staticmethod
    def check(out: Any, last: nn.Module, x: torch.Tensor) -> int | None:
        """``extra`` for a parent whose real output is ``out`` on the batch where ``last`` saw
        ``x``, or None when ``last(x)`` is not that output (or the tuple carries more than None)."""
        y = out
        if isinstance(out, tuple):
            if not out or any(o is not None for o in out[1:]):
                return None
            y = out[0]
        if not isinstance(y, torch.Tensor) or y.shape[:-1] != x.shape[:-1]:
            return None
        rows = slice(0, 16)  # a few rows tell: on the whole batch the check cost a third of a pass
        x, y = x.reshape(-1, x.shape[-1])[rows], y.reshape(-1, y.shape[-1])[rows]
        with torch.no_grad():
            z = last.forward(x.to(y.device))  # forward(): no hook fires twice
        # a few rounding steps of the dtype: another kernel (a 16-row GEMM on a GPU) rounds differently
        tol = max(1e-5, 4 * torch.finfo(y.dtype).eps) if y.is_floating_point() else 0.0
        atol = max(tol / 10, 1e-6) * float(y.abs().max().clamp_min(1e-30))
        if z.shape != y.shape or not torch.allclose(z, y, rtol=tol, atol=atol):
            return None
        return len(out) - 1 if isinstance(out, tuple) else -1

    def stub(self, last: nn.Module, b: int, device: torch.device) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            y = last(self.store[b].to(device))
            return y if self.extra < 0 else (y, *([None] * self.extra))

        return forward



class Replays:
    """The replays of one layer being compressed: parent path -> :class:`_Replay`."""

    def __init__(self) -> None:
        self.by_parent: dict[str, _Replay] = {}

    @staticmethod
    def units(groups: list[list[str]], names: list[str]) -> dict[str, tuple[str, int]]:
        """Linears among ``names`` that are the last operation of a module of their own (o of the
        attention, down of the MLP: a one-linear group with a parent below the layer): name ->
        (parent path, group index). Only those can stand in for their parent (see :class:`_Replay`)."""
        units = {}
        for i, group in enumerate(groups):
            if len(group) == 1 and group[0] in names and "." in group[0]:
                units[group[0]] = (group[0].rsplit(".", 1)[0], i)
        return units

    def forget(self, parent: str) -> None:
        rep = self.by_parent.pop(parent, None)
        if rep is not None:
            rep.store.clear()

    def clear(self) -> None:
        for parent in list(self.by_parent):
            self.forget(parent)

    def forget_around(self, names: list[str]) -> None:
        """A module with hooks inside it runs (and is recorded) afresh."""
        for parent in list(self.by_parent):
            if any(n.startswith(parent + ".") for n in names):
                self.forget(parent)

    def replaced(self, name: str, group: int | None) -> None:
        """Linear ``name`` of group ``group`` was replaced: a replay stays exact while only its own
        last linear or what comes after its parent changes."""
        for parent, rep in list(self.by_parent.items()):
            if name != rep.last and (group is None or group <= rep.group):
                self.forget(parent)

    @contextmanager
    def stubbed(self, layer: nn.Module, b: int, device: torch.device) -> Iterator[None]:
        """Every replayed parent's ``forward`` swapped for its stub on batch ``b`` meanwhile."""
        stubbed = []
        try:
            for parent, rep in self.by_parent.items():
                mod = layer.get_submodule(parent)
                mod.forward = rep.stub(layer.get_submodule(rep.last), b, device)
                stubbed.append(mod)
            yield
        finally:
            for mod in stubbed:
                mod.__dict__.pop("forward", None)


class Recording:
    """One statistics pass recording the inputs of ``units`` (see :meth:`Replays.units`): their
    pre-hooks go on before the statistics' (which may stop the forward), the checks of their
    parents after; :meth:`keep` turns the checked ones into replays."""

    def __init__(self, units: dict[str, tuple[str, int]], budget: MemoryBudget) -> None:
        self.units = units
        self.records = {name: TensorStore(budget) for name in units}
        self.checked: dict[str, int | None] = {}  # name -> _Replay.extra of its parent, None: no replay

    def record_hooks(self, layer: nn.Module) -> list:
        def record_hook(name: str) -> Callable:
            def pre(mod: nn.Module, a: tuple) -> None:
                self.records[name].append(a[0].detach().contiguous())

            return pre

        return [layer.get_submodule(n).register_forward_pre_hook(record_hook(n)) for n in self.units]

    def check_hooks(self, layer: nn.Module, first_batch: Callable[[], bool], done: Callable[[tuple], None]) -> list:
        def check_hook(name: str) -> Callable:
            def post(mod: nn.Module, a: tuple, out: Any) -> None:
                if not first_batch():
                    return
                self.checked[name] = _Replay.check(out, layer.get_submodule(name), self.records[name][0])
                done(("parent", name))

            return post

        return [layer.get_submodule(p).register_forward_hook(check_hook(n)) for n, (p, _) in self.units.items()]

    def abort(self) -> None:
        for rec in self.records.values():
            rec.clear()

    def keep(self, replays: Replays, batches: int, prefix: str) -> None:
        for name, (parent, group) in self.units.items():
            if self.checked.get(name) is not None and len(self.records[name]) == batches:
                replays.by_parent[parent] = _Replay(name, group, self.records[name], self.checked[name])
            else:
                log.debug("%s.%s: not the last operation of %s, no replay", prefix, name, parent)
                self.records[name].clear()
