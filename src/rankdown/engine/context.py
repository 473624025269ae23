"""One layer being compressed, with what a method may ask of the engine (docs/METHODS.md §0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rankdown import distributed, heap
from rankdown.arch import ArchSpec
from rankdown.engine.capture import LayerInputs, _StopForward, cast, to_device
from rankdown.engine.observers import InputObserver, OutputObserver, ScalarSum, SharedInputs, merge
from rankdown.engine.replay import Recording, Replays
from rankdown.linalg import Guard
from rankdown.nn.portable import LowRankLinear
from rankdown.stats import InputStats
from rankdown.storage import MemoryBudget, TensorStore
from rankdown.timing import Stages


def module_spec(module: nn.Module) -> dict:
    """The JSON-able record of a compressed module (see nn/portable.py)."""
    if isinstance(module, LowRankLinear):
        return module.spec()
    if hasattr(module, "spec"):
        return module.spec()
    raise TypeError(f"{type(module).__name__} has no structure record")


@dataclass
class LayerContext:
    """One layer being compressed, with what the method may ask of the engine."""

    index: int
    prefix: str  # dotted path of the layer in the model, e.g. "model.layers.3"
    layer: nn.Module
    spec: ArchSpec
    _inputs: LayerInputs | None  # the engine's: a method asks through the methods below
    device: torch.device
    replaced: dict[str, dict] = field(default_factory=dict)  # path in layer -> module record
    guards: dict[str, dict] = field(default_factory=dict)
    budget: MemoryBudget = field(default_factory=MemoryBudget)  # RAM allowed for activations (--max-memory)
    # what a method hands from one layer to the next during one walk (the engine frees it after)
    carry: dict[str, Any] = field(default_factory=dict)
    _outputs: TensorStore | None = field(default=None, repr=False)  # this layer's outputs, while still valid
    _replays: Replays = field(default_factory=Replays, repr=False)  # recorded inputs of last linears
    timer: Stages = field(default_factory=Stages, repr=False)  # the run's stage clock (rankdown.timing)

    # -- the layer ---------------------------------------------------------------------------------
    def groups(self) -> list[list[str]]:
        return self.spec.groups(self.layer)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def replace(self, name: str, new: nn.Module) -> None:
        self.layer.set_submodule(name, new)
        self.replaced[name] = module_spec(new)
        self._forget_outputs()
        self._replays.replaced(name, self._group_of(name))

    def changed(self) -> None:
        """The method changed the layer's weights in place (training): what the engine kept of
        the layer's earlier passes (its outputs, the recorded inputs of replayed modules) is stale,
        and the next layer's inputs come from a full run of the layer as it is now."""
        self._forget_outputs()
        self._replays.clear()

    def note(self, name: str, guard: Guard) -> None:
        self.guards[name] = guard.to_dict()

    def _group_of(self, name: str) -> int | None:
        for i, group in enumerate(self.groups()):
            if name in group:
                return i
        return None

    def _replay_units(self, names: list[str]) -> dict[str, tuple[str, int]]:
        return Replays.units(self.groups(), names)

    def _forget_outputs(self) -> None:
        if self._outputs is not None:
            self._outputs.clear()
            self._outputs = None

    # -- the calibration batches ---------------------------------------------------------------------
    @property
    def batches(self) -> int:
        """How many calibration batches this process holds."""
        return len(self._inputs.hidden)

    def layer_inputs(self) -> TensorStore:
        """The layer's inputs per batch (b, L, d), on the CPU: the engine's store, to read only."""
        return self._inputs.hidden

    def mask(self, b: int) -> torch.Tensor | None:
        """Batch ``b``'s real tokens (b, L) bool on the device, None when all are real."""
        m = self._inputs.masks[b]
        return None if m is None else m.to(self.device)

    def new_store(self) -> TensorStore:
        """An empty activation store within the run's memory budget (``--max-memory``)."""
        return TensorStore(self.budget)

    def call(self, hidden: torch.Tensor, b: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer's output on ``hidden`` (b, L, d) with batch ``b``'s other arguments, computed on
        the device in ``dtype`` (every floating input cast to it) when given."""
        def move(obj: Any) -> Any:
            return to_device(obj, self.device) if dtype is None else cast(obj, self.device, dtype)

        out = self.layer(move(hidden), *move(self._inputs.args[b]), **move(self._inputs.kwargs[b]))
        return out[0] if isinstance(out, tuple) else out

    def _run(self, b: int) -> torch.Tensor:
        assert self._inputs is not None, "this method declared needs_calibration = False"
        with self._replays.stubbed(self.layer, b, self.device):
            return self.call(self._inputs.hidden[b], b)

    # -- statistics ------------------------------------------------------------------------------------
    def collect(
        self, inputs: list[str], outputs: list[str] = (), gram: bool = True, keep_outputs: bool = False,
        replay: bool = False,
    ) -> tuple[dict[str, InputStats], dict[str, InputStats]]:
        """Float64 statistics of the inputs of linears ``inputs`` and of the outputs ``W x`` (bias
        left out) of linears ``outputs``, in ONE pass over the calibration batches.

        Input statistics: linears fed the same tensor (q, k, v) share one :class:`InputStats` (and
        when all of ``inputs`` are of one group, which shares its input by definition, the first one's
        hook stands for all: the forward does not run gate to reach up); a linear that saw no token
        (an expert never routed to) gets empty ones. Output statistics:
        ``gram`` is ``C_out = Σ (Wx)(Wx)ᵀ`` (out, out), ``mean`` is ``W μ_in`` — the cheaper choice
        for a linear with ``out <= in``. Padding rows are left out; each batch's forward stops once
        every hook has fired. Under torchrun the statistics are summed over the processes before
        they are returned, so they are those of all the calibration batches.

        ``keep_outputs``: run every batch's forward to the end and keep the layer's outputs, so that
        :meth:`outputs` (the next layer's inputs) costs no second pass while no module is replaced.

        ``replay``: also record the inputs of a collected linear that ends a module of its own (the
        attention's o, the MLP's down), so that later passes over this layer compute that module as
        its last linear applied to the recorded inputs instead of running it again (see
        :mod:`rankdown.engine.replay`): the sequential loop then runs the attention once, not four times.
        """
        with self.timer.stage("statistics"):
            return self._collect(inputs, outputs, gram, keep_outputs, replay)

    @torch.no_grad()
    def _collect(self, inputs: list[str], outputs: list[str], gram: bool, keep_outputs: bool,
                 replay: bool) -> tuple[dict[str, InputStats], dict[str, InputStats]]:
        self._replays.forget_around([*inputs, *outputs])  # a module with hooks inside it runs afresh
        recording = Recording(self._replay_units([*inputs, *outputs]) if replay else {}, self.budget)
        same = (len(inputs) > 1 and self.spec.experts is None
                and any(set(inputs) <= set(g) for g in self.groups()))
        shared = SharedInputs(self.device, gram, same)
        ins = {n: InputObserver(n, self.module(n).in_features, shared) for n in inputs}
        outs = {n: OutputObserver(n, self.module(n), self.device) for n in outputs}
        observers = [*ins.values(), *outs.values()]
        seen: set[tuple[str, str]] = set()
        batch = [0]
        want_all = -1 if keep_outputs else len(inputs) + len(outputs)  # -1: never stop early
        kept = TensorStore(self.budget) if keep_outputs else None

        def done(key: tuple[str, str]) -> None:
            seen.add(key)
            # on the first batch the parents of the recorded linears are also awaited (checked)
            want = want_all + (len(recording.units) if batch[0] == 0 and want_all >= 0 else 0)
            if len(seen) == want:
                raise _StopForward

        def pre_hook(obs: InputObserver) -> Callable:
            def pre(mod: nn.Module, a: tuple) -> None:
                seen.update(("in", n) for n in obs.add_batch(a[0]))
                done(("in", obs.name))

            return pre

        def post_hook(obs: OutputObserver) -> Callable:
            def post(mod: nn.Module, a: tuple, y: torch.Tensor) -> None:
                obs.add_batch(a[0], y)
                done(("out", obs.name))

            return post

        # recording first: a statistics hook may stop the forward
        handles = recording.record_hooks(self.layer)
        handles += [self.module(n).register_forward_pre_hook(pre_hook(o)) for n, o in ins.items()]
        handles += [self.module(n).register_forward_hook(post_hook(o)) for n, o in outs.items()]
        handles += recording.check_hooks(self.layer, lambda: batch[0] == 0, done)
        try:
            for b in range(self.batches):
                batch[0] = b
                seen.clear()
                mask = self.mask(b)
                for o in observers:
                    o.start(mask)
                try:
                    y = self._run(b)
                    if kept is not None:
                        kept.append(y)
                        del y
                except _StopForward:
                    pass
        except BaseException:
            if kept is not None:
                kept.clear()
            recording.abort()
            raise
        finally:
            for h in handles:
                h.remove()
        recording.keep(self._replays, self.batches, self.prefix)
        if kept is not None:
            self._forget_outputs()
            self._outputs = kept
        merge(observers)
        heap.trim()  # the pass's activations, freed into the heap: returned before the factorisations peak
        return {n: o.stats for n, o in ins.items()}, {n: o.stats for n, o in outs.items()}

    def collect_inputs(self, names: list[str], gram: bool = True, replay: bool = False) -> dict[str, InputStats]:
        """Input statistics of the named linears (see :meth:`collect`)."""
        return self.collect(names, (), gram, replay=replay)[0]

    def collect_outputs(self, names: list[str]) -> dict[str, InputStats]:
        """Output statistics of the named linears (see :meth:`collect`)."""
        return self.collect((), names)[1]

    @torch.no_grad()
    def outputs(self) -> TensorStore:
        """The layer's outputs on every batch, on the CPU (or disk beyond the budget): the next
        layer's inputs. Computed once while no module is replaced (also by :meth:`collect` with
        ``keep_outputs``): the store is shared with the engine, so a visit must not clear it."""
        if self._outputs is None:
            with self.timer.stage("forward"):
                out = TensorStore(self.budget)
                for b in range(self.batches):
                    out.append(self._run(b))
            self._outputs = out
        return self._outputs

    # -- under torchrun -----------------------------------------------------------------------------------
    @property
    def processes(self) -> int:
        """How many processes share the calibration batches (1 without torchrun)."""
        return distributed.world()

    def most_batches(self) -> int:
        """The most calibration batches a process holds (this one's count without torchrun)."""
        return distributed.all_max(self.batches)

    def sum_over_processes(self, values: list[float]) -> list[float]:
        """The sums over the processes of numbers each computed on its own batches."""
        total = ScalarSum(len(values))
        total.add(*values)
        merge([total])
        return total.values

    @torch.no_grad()
    def mean_over_tokens(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """The mean over the real tokens of every calibration batch (of every process under torchrun)
        of ``f(x, y)`` (b, L), ``x`` the layer's inputs (b, L, d) on the CPU, ``y`` its outputs
        (b, L, d) as :meth:`outputs` keeps them."""
        ys = self.outputs()
        total = ScalarSum(2)  # the sum and the count
        for b in range(len(ys)):
            x, y = self._inputs.hidden[b], ys[b]
            v = f(x, y)
            m = self._inputs.masks[b]
            v = v if m is None else v[m.to(v.device)]
            total.add(float(v.sum()), v.numel())
        # ys stays: the engine hands the same store on as the next layer's inputs (one forward)
        merge([total])
        s, count = total.values
        return s / max(count, 1)
