"""The sequential layer loop (docs/METHODS.md §0). The engine owns the loop; a method owns the math.

1. Capture what every layer is called with, per calibration batch: the first layer's hidden
   states and every layer's other arguments (attention masks, rotary cos/sin, position ids ...),
   by swapping each layer's ``forward`` for a recorder for one forward pass of the model. No layer
   computes anything in that pass, and layer-specific arguments (Gemma 2's sliding-window masks)
   are kept per layer.
2. For each layer in order, on the chosen device: the method compresses it, asking the engine for
   input statistics group by group (each group sees the outputs of the groups already compressed);
   then the compressed layer is run to produce the next layer's inputs. So every layer is calibrated
   on the errors made upstream.
Before that, a method's ``plan`` may walk the still-dense model the same way once, only reading
statistics (:class:`PlanContext`: ROM's global allocation reads every linear's output spectrum).
Hooks are always removed, forwards always restored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from rankdown import distributed, heap
from rankdown.arch import ArchSpec
from rankdown.linalg import Guard
from rankdown.nn.portable import LowRankLinear
from rankdown.spill import MemoryBudget, TensorStore
from rankdown.stats import InputStats

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a forward once everything needed from it has been seen."""


def to_device(obj: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device``.

    ``memo`` (a dict the caller keeps while the tensors it has seen stay alive) makes a tensor met
    again, here or in a later call, come back as the same moved copy: the model hands one rotary
    table and one mask to all its layers, and a copy per layer would be kept on the host otherwise.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        hit = memo.get(id(obj))
        if hit is None or hit[0] is not obj:
            hit = memo[id(obj)] = (obj, obj.to(device))  # the source is kept: its id cannot be reused
        return hit[1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def module_spec(module: nn.Module) -> dict:
    """The JSON-able record of a compressed module (see nn/portable.py)."""
    if isinstance(module, LowRankLinear):
        return module.spec()
    if hasattr(module, "spec"):
        return module.spec()
    raise TypeError(f"{type(module).__name__} has no structure record")


@dataclass
class LayerInputs:
    """Everything one layer is called with, per batch."""

    hidden: "TensorStore | list[torch.Tensor]"  # per batch (b, L, d), on the CPU (RAM or disk)
    args: list[tuple]  # per batch: positional arguments after the hidden states
    kwargs: list[dict]  # per batch: keyword arguments
    masks: list[torch.Tensor | None]  # per batch (b, L) bool of real tokens, None when all real


@torch.no_grad()
def capture(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    batch_size: int, device: torch.device, store: Any = None,
) -> tuple[Any, list[list[tuple]], list[list[dict]], list[torch.Tensor | None]]:
    """Hidden states entering layer 0, and the other arguments of every layer, per batch.

    input_ids, attention_mask: (n, L). Returns hidden (per batch), args[layer][batch],
    kwargs[layer][batch], masks[batch]. Only the modules outside the layers compute. ``store``
    (a list or :class:`TensorStore`) receives the hidden states. Under torchrun, only this process's
    share of the batches (see :func:`rankdown.distributed.shard`).
    """
    n_layers = len(layers)
    hidden = [] if store is None else store
    args: list[list[tuple]] = [[] for _ in range(n_layers)]
    kwargs: list[list[dict]] = [[] for _ in range(n_layers)]

    def recorder(i: int) -> Callable:
        def forward(*a: Any, **kw: Any) -> Any:
            h = a[0] if a else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
            args[i].append(to_device(tuple(a[1:]), "cpu", memo))
            kwargs[i].append(to_device(kw, "cpu", memo))
            if i == 0:
                hidden.append(h.detach().to("cpu"))
            if i == n_layers - 1:
                raise _StopForward
            return h

        return forward

    masks: list[torch.Tensor | None] = []
    memo: dict = {}  # one host copy of what the layers share (rotary tables, masks) per batch
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for ids, am in distributed.shard(list(zip(input_ids.split(batch_size), attention_mask.split(batch_size)))):
            memo.clear()
            masks.append(None if bool(am.all()) else am.bool())
            try:
                model(input_ids=ids.to(device), attention_mask=am.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return hidden, args, kwargs, masks


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


@dataclass
class LayerContext:
    """One layer being compressed, with what the method may ask of the engine."""

    index: int
    prefix: str  # dotted path of the layer in the model, e.g. "model.layers.3"
    layer: nn.Module
    spec: ArchSpec
    inputs: LayerInputs | None
    device: torch.device
    replaced: dict[str, dict] = field(default_factory=dict)  # path in layer -> module record
    guards: dict[str, dict] = field(default_factory=dict)
    budget: MemoryBudget = field(default_factory=MemoryBudget)  # RAM allowed for activations (--max-memory)
    _outputs: TensorStore | None = field(default=None, repr=False)  # this layer's outputs, while still valid
    _replays: dict[str, "_Replay"] = field(default_factory=dict, repr=False)  # parent path -> recorded inputs of its last linear

    def groups(self) -> list[list[str]]:
        return self.spec.groups(self.layer)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def replace(self, name: str, new: nn.Module) -> None:
        self.layer.set_submodule(name, new)
        self.replaced[name] = module_spec(new)
        self._forget_outputs()
        group = self._group_of(name)
        for parent, rep in list(self._replays.items()):
            # a replay stays exact while only its own last linear or what comes after its parent changes
            if name != rep.last and (group is None or group <= rep.group):
                self._forget_replay(parent)

    def _group_of(self, name: str) -> int | None:
        for i, group in enumerate(self.groups()):
            if name in group:
                return i
        return None

    def _forget_replay(self, parent: str) -> None:
        rep = self._replays.pop(parent, None)
        if rep is not None:
            rep.store.clear()

    def _forget_replays(self) -> None:
        for parent in list(self._replays):
            self._forget_replay(parent)

    def _replay_units(self, names: list[str]) -> dict[str, tuple[str, int]]:
        """Linears among ``names`` that are the last operation of a module of their own (o of the
        attention, down of the MLP: a one-linear group with a parent below the layer): name ->
        (parent path, group index). Only those can stand in for their parent (see :class:`_Replay`)."""
        units = {}
        for i, group in enumerate(self.groups()):
            if len(group) == 1 and group[0] in names and "." in group[0]:
                units[group[0]] = (group[0].rsplit(".", 1)[0], i)
        return units

    def _forget_outputs(self) -> None:
        if self._outputs is not None:
            self._outputs.clear()
            self._outputs = None

    def note(self, name: str, guard: Guard) -> None:
        self.guards[name] = guard.to_dict()

    def _run(self, b: int) -> torch.Tensor:
        assert self.inputs is not None, "this method declared needs_calibration = False"
        h = self.inputs.hidden[b].to(self.device)
        stubbed = []
        try:
            for parent, rep in self._replays.items():
                mod = self.layer.get_submodule(parent)
                mod.forward = rep.stub(self.layer.get_submodule(rep.last), b, self.device)
                stubbed.append(mod)
            out = self.layer(h, *to_device(self.inputs.args[b], self.device), **to_device(self.inputs.kwargs[b], self.device))
        finally:
            for mod in stubbed:
                mod.__dict__.pop("forward", None)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
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
        :class:`_Replay`): the sequential loop then runs the attention once, not four times.
        """
        ins: dict[str, InputStats] = {}
        outs = {n: InputStats(self.module(n).out_features, self.device, True) for n in outputs}
        shared: dict[int, tuple[torch.Tensor, InputStats]] = {}
        seen: set[tuple[str, str]] = set()
        for parent in list(self._replays):  # a module with hooks inside it runs (and is recorded) afresh
            if any(n.startswith(parent + ".") for n in (*inputs, *outputs)):
                self._forget_replay(parent)
        units = self._replay_units([*inputs, *outputs]) if replay else {}
        records = {name: TensorStore(self.budget) for name in units}
        # linears of one group share their input (q, k, v; gate, up), experts aside: the first one's
        # pre-hook stands for all, so the forward need not run gate to reach up's hook
        same = (len(inputs) > 1 and self.spec.experts is None
                and any(set(inputs) <= set(g) for g in self.groups()))
        checked: dict[str, int | None] = {}  # name -> _Replay.extra of its parent, None: no replay
        batch = [0]
        want_all = -1 if keep_outputs else len(inputs) + len(outputs)  # -1: never stop early
        kept = TensorStore(self.budget) if keep_outputs else None
        mask: list[torch.Tensor | None] = [None]

        def add(stats: InputStats, x: torch.Tensor, shift: torch.Tensor | None = None) -> None:
            m = mask[0]
            stats.add(x[m] if m is not None and x.shape[:-1] == m.shape else x, shift=shift)

        def done(key: tuple[str, str]) -> None:
            seen.add(key)
            # on the first batch the parents of the recorded linears are also awaited (checked)
            want = want_all + (len(units) if batch[0] == 0 and want_all >= 0 else 0)
            if len(seen) == want:
                raise _StopForward

        def record_hook(name: str) -> Callable:
            def pre(mod: nn.Module, a: tuple) -> None:
                records[name].append(a[0].detach().contiguous())

            return pre

        def check_hook(name: str) -> Callable:
            def post(mod: nn.Module, a: tuple, out: Any) -> None:
                if batch[0] != 0:
                    return
                checked[name] = _Replay.check(out, self.module(name), records[name][0])
                done(("parent", name))

            return post

        def pre_hook(name: str) -> Callable:
            def pre(mod: nn.Module, a: tuple) -> None:
                x = a[0]
                hit = shared.get(id(x))
                if hit is not None and hit[0] is x:
                    ins[name] = hit[1]
                else:
                    s = ins.get(name) or InputStats(x.shape[-1], self.device, gram)
                    add(s, x)
                    ins[name] = shared.setdefault(id(x), (x, s))[1]
                if same:
                    for n in inputs:
                        ins.setdefault(n, ins[name])
                        seen.add(("in", n))
                done(("in", name))

            return pre

        def post_hook(name: str) -> Callable:
            def post(mod: nn.Module, a: tuple, y: torch.Tensor) -> None:
                # promoted to float64 by the statistics a block of rows at a time, not whole here
                add(outs[name], y, getattr(mod, "bias", None))
                done(("out", name))

            return post

        # recording first: a statistics hook may stop the forward
        handles = [self.module(n).register_forward_pre_hook(record_hook(n)) for n in units]
        handles += [self.module(n).register_forward_pre_hook(pre_hook(n)) for n in inputs]
        handles += [self.module(n).register_forward_hook(post_hook(n)) for n in outputs]
        handles += [self.module(p).register_forward_hook(check_hook(n)) for n, (p, _) in units.items()]
        try:
            for b in range(len(self.inputs.hidden)):
                batch[0] = b
                seen.clear()
                shared.clear()
                m = self.inputs.masks[b]
                mask[0] = None if m is None else m.to(self.device)
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
            for rec in records.values():
                rec.clear()
            raise
        finally:
            for h in handles:
                h.remove()
        for name, (parent, group) in units.items():
            if checked.get(name) is not None and len(records[name]) == len(self.inputs.hidden):
                self._replays[parent] = _Replay(name, group, records[name], checked[name])
            else:
                log.debug("%s.%s: not the last operation of %s, no replay", self.prefix, name, parent)
                records[name].clear()
        if kept is not None:
            self._forget_outputs()
            self._outputs = kept
        for n in inputs:
            if n not in ins:
                ins[n] = InputStats(self.module(n).in_features, self.device, gram)
        distributed.all_reduce_stats([ins[n] for n in inputs] + [outs[n] for n in outputs])
        heap.trim()  # the pass's activations, freed into the heap: returned before the factorisations peak
        return ins, outs

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
            out = TensorStore(self.budget)
            for b in range(len(self.inputs.hidden)):
                out.append(self._run(b))
            self._outputs = out
        return self._outputs


def walk_layers(
    model: nn.Module,
    spec: ArchSpec,
    visit: Callable[[LayerContext], None],
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    device: torch.device | str,
    desc: str = "layers",
    progress: bool = True,
    budget: MemoryBudget | None = None,
    source: Any = None,
    write: bool = False,
) -> list[float]:
    """Call ``visit`` on every layer in order, on ``device``; returns the seconds spent per layer.

    Each layer is fed the outputs of the layers before it as they are after their visit
    (compressed, or dense when the visits only read statistics). Without ``input_ids`` the layers
    get no inputs (data-free methods) and nothing is run. Activations beyond ``budget`` go to disk.
    ``source`` (a :class:`rankdown.stream.StreamedModel`) reads each layer before its visit and
    takes it back after (writing it out when ``write``): then only one layer is ever in memory.
    """
    device = torch.device(device)
    own_budget = budget is None
    budget = MemoryBudget() if budget is None else budget
    path, layers = spec.find_layers(model)
    calibrate = input_ids is not None
    # where the model is kept between layers, and given back: the host, or a device it was put on
    home = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    was_training = model.training
    model.eval()
    inputs = None
    seconds: list[float] = []
    try:
        if calibrate:
            if source is not None:
                source.load_outside()
            _place_outside_layers(model, path, device)
            hidden, args, kwargs, masks = capture(model, layers, input_ids, attention_mask, batch_size, device,
                                                  TensorStore(budget))
            if source is not None:
                source.drop_outside()
        bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            layer = layers[i]
            if source is not None:
                source.load(i, layer)
            layer.to(device)
            if calibrate:
                inputs = LayerInputs(hidden, args[i], kwargs[i], masks)
            ctx = LayerContext(i, f"{path}.{i}", layer, spec, inputs, device, budget=budget)
            visit(ctx)
            if calibrate:
                if i + 1 < len(layers):
                    nxt = ctx.outputs()
                else:
                    nxt = None
                    ctx._forget_outputs()  # kept by a collect of the last layer: not needed
                ctx._forget_replays()
                hidden.clear()
                hidden = nxt
            if source is not None:
                source.release(i, layer, write, ctx, time.perf_counter() - t0)
            elif device.type != "cpu":
                layer.to(home)
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(layer=i, replaced=len(ctx.replaced), s=f"{seconds[-1]:.1f}")
            log.info("%s: layer %d, %d modules replaced in %.2fs", desc, i, len(ctx.replaced), seconds[-1])
    finally:
        if device.type != "cpu" and source is None:
            model.to(home)
        model.train(was_training)
        if own_budget:
            budget.cleanup()
    return seconds


def run_sequential(
    model: nn.Module,
    spec: ArchSpec,
    method: Any,
    ranks: dict[str, int],
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    device: torch.device | str,
    progress: bool = True,
    budget: MemoryBudget | None = None,
    source: Any = None,
) -> tuple[dict[str, dict], dict[str, dict], list[float]]:
    """Compress ``model`` in place, layer by layer.

    ranks: full dotted path -> rank (a target left out stays dense). Returns (structure modules:
    path -> record, guards: path -> guard, seconds per layer).
    """
    modules: dict[str, dict] = {}
    guards: dict[str, dict] = {}

    def visit(ctx: LayerContext) -> None:
        done = None if source is None else source.finished(ctx.index)
        if done is not None:  # compressed by an earlier, interrupted run (resume): only its records
            modules.update(done["modules"])
            guards.update(done["guards"])
            return
        n = len(ctx.prefix) + 1
        layer_ranks = {k[n:]: r for k, r in ranks.items() if k.startswith(ctx.prefix + ".")}
        if layer_ranks:
            method.compress_layer(ctx, layer_ranks)
        modules.update({f"{ctx.prefix}.{k}": v for k, v in ctx.replaced.items()})
        guards.update({f"{ctx.prefix}.{k}": v for k, v in ctx.guards.items()})

    if not method.needs_calibration:
        input_ids = attention_mask = None
    seconds = walk_layers(model, spec, visit, input_ids, attention_mask, batch_size, device,
                          type(method).__name__, progress, budget, source, write=True)
    return modules, guards, seconds


@dataclass
class PlanContext:
    """What :meth:`Method.plan` may ask of the engine before compressing: a statistics pass.

    ``calibration`` loads the calibration tokens on first use (an object with ``input_ids`` and
    ``attention_mask``), so methods that plan without data never pay for it.
    """

    model: nn.Module
    spec: ArchSpec
    calibration: Callable[[], Any]
    batch_size: int
    device: torch.device | str
    progress: bool = True
    budget: MemoryBudget | None = None
    source: Any = None  # a StreamedModel when the model is read layer by layer
    stats_cache: Any = None  # a rankdown.stats_cache.StatsCache (--stats-cache)

    def cached(self, kind: str, settings: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``compute()`` (a dict of tensors from a statistics pass), or the same from the statistics
        cache when a run of the same model, calibration and ``settings`` stored it."""
        if self.stats_cache is None:
            return compute()
        from rankdown.stats_cache import model_digest, tensor_digest

        data = self.calibration()
        params = next(self.model.parameters())
        key = {"kind": kind, "settings": settings,
               "model": self.source.digest() if self.source is not None else model_digest(self.model),
               "calibration": tensor_digest(data.input_ids) + tensor_digest(data.attention_mask),
               "batch_size": self.batch_size, "dtype": str(params.dtype), "device": torch.device(self.device).type}
        # under torchrun, process 0's cache decides for all (a hit on one, a miss on another would hang)
        return distributed.from_main(lambda c: self.stats_cache.get_or_compute(key, c), compute)

    def walk_dense(self, visit: Callable[[LayerContext], None], max_tokens: int = 0) -> None:
        """Call ``visit`` on every layer of the still-dense model, each fed the dense outputs of the
        one before. ``visit`` may only collect statistics; a visit that replaces a module fails.
        ``max_tokens`` > 0: only the first calibration rows holding that many real tokens.
        """

        def guarded(ctx: LayerContext) -> None:
            visit(ctx)
            if ctx.replaced:
                raise RuntimeError(f"{ctx.prefix}: a planning visit must not replace modules ({list(ctx.replaced)})")

        data = self.calibration()
        ids, mask = data.input_ids, data.attention_mask
        if max_tokens > 0:
            rows = int((mask.sum(1).cumsum(0) < max_tokens).sum()) + 1
            ids, mask = ids[:rows], mask[:rows]
        walk_layers(self.model, self.spec, guarded, ids, mask, self.batch_size,
                    self.device, "statistics", self.progress, self.budget, self.source)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _place_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the layer list to ``device`` (ties kept). What is
    already there, what is on the meta device (a streamed model's output head), and an output head
    not tied to the input embeddings (the calibration pass stops before it: 2 GB of GPU memory for a
    128k x 4096 float32 head) are left as they are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in emb.parameters()} if emb is not None else set()
    skip = {id(p) for p in head.parameters() if id(p) not in tied} if head is not None else set()
    moved: dict[int, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for key, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta and not _on(p, device) and id(p) not in skip:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
                mod._parameters[key] = moved[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and not _on(b, device):
                mod._buffers[key] = b.to(device)
