"""The sequential layer loop (docs/METHODS.md §0). The engine owns the loop; a method owns the math.

1. Capture what every layer is called with, per calibration batch (see capture.py).
2. For each layer in order, on the chosen device: the method compresses it, asking the engine for
   input statistics group by group (each group sees the outputs of the groups already compressed);
   then the compressed layer is run to produce the next layer's inputs. So every layer is calibrated
   on the errors made upstream.
Before that, a method's ``plan`` may walk the still-dense model the same way once, only reading
statistics (:class:`PlanContext`: ROM's global allocation reads every linear's output spectrum).
Where the layers are kept between their visits is the :class:`~rankdown.storage.LayerStore`'s
business. Hooks are always removed, forwards always restored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from rankdown import distributed
from rankdown.arch import ArchSpec
from rankdown.engine.capture import LayerInputs, _place_outside_layers, capture
from rankdown.engine.context import LayerContext
from rankdown.storage import LayerStore, MemoryBudget, MemoryStore, TensorStore
from rankdown.timing import Stages

log = logging.getLogger(__name__)


def walk_layers(
    model: nn.Module,
    spec: ArchSpec,
    visit: Callable[[LayerContext], None],
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    device: torch.device | str,
    store: LayerStore,
    desc: str = "layers",
    progress: bool = True,
    budget: MemoryBudget | None = None,
    write: bool = False,
    timer: Stages | None = None,
) -> tuple[list[float], list[dict]]:
    """Call ``visit`` on every layer in order, on ``device``; returns the seconds spent per layer
    and, when ``write``, every layer's records (``modules``, ``guards``: full path -> record).

    Each layer is fed the outputs of the layers before it as they are after their visit
    (compressed, or dense when the visits only read statistics). Without ``input_ids`` the layers
    get no inputs (data-free methods) and nothing is run. Activations beyond ``budget`` go to disk.
    ``store`` gives each layer before its visit and takes it back after (with its records when
    ``write``); a layer it gives with records (finished by an earlier run) is not visited, only run.
    ``timer``: the run's stage clock: the capture and the passes that only make the next layer's
    inputs count as ``forward``, each visit as ``decompositions`` less what it counts itself
    (``statistics``, ``distillation``; see rankdown/timing.py).
    """
    device = torch.device(device)
    timer = Stages() if timer is None else timer
    own_budget = budget is None
    budget = MemoryBudget() if budget is None else budget
    path, layers = spec.find_layers(model)
    calibrate = input_ids is not None
    store.begin(device)
    was_training = model.training
    model.eval()
    inputs = None
    carry: dict[str, Any] = {}  # what a method hands from one layer's visit to the next
    seconds: list[float] = []
    records: list[dict] = []
    try:
        if calibrate:
            store.load_outside()
            _place_outside_layers(model, path, device)
            with timer.stage("forward"):
                hidden, args, kwargs, masks = capture(model, layers, input_ids, attention_mask, batch_size, device,
                                                      TensorStore(budget))
            store.drop_outside()
        bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            layer = layers[i]
            done = store.load(i, layer)
            layer.to(device)
            if calibrate:
                inputs = LayerInputs(hidden, args[i], kwargs[i], masks)
            ctx = LayerContext(i, f"{path}.{i}", layer, spec, inputs, device, budget=budget, carry=carry, timer=timer)
            if done is None:
                with timer.stage("decompositions"):
                    visit(ctx)
            if calibrate:
                if i + 1 < len(layers):
                    nxt = ctx.outputs()
                else:
                    nxt = None
                    ctx._forget_outputs()  # kept by a collect of the last layer: not needed
                ctx._replays.clear()
                hidden.clear()
                hidden = nxt
            record = None
            if write:
                record = done if done is not None else {
                    "modules": {f"{ctx.prefix}.{k}": v for k, v in ctx.replaced.items()},
                    "guards": {f"{ctx.prefix}.{k}": v for k, v in ctx.guards.items()},
                    "seconds": time.perf_counter() - t0}
                records.append(record)
            store.commit(i, layer, None if done is not None else record)
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(layer=i, replaced=len(ctx.replaced), s=f"{seconds[-1]:.1f}")
            log.info("%s: layer %d, %d modules replaced in %.2fs", desc, i, len(ctx.replaced), seconds[-1])
    finally:
        for value in carry.values():  # a method's activations left for a layer that never came
            if isinstance(value, TensorStore):
                value.clear()
        store.end()
        model.train(was_training)
        if own_budget:
            budget.cleanup()
    return seconds, records


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
    store: LayerStore | None = None,
    timer: Stages | None = None,
) -> tuple[dict[str, dict], dict[str, dict], list[float]]:
    """Compress ``model`` in place, layer by layer (kept in ``store``, by default in memory).

    ranks: full dotted path -> rank (a target left out stays dense). Returns (structure modules:
    path -> record, guards: path -> guard, seconds per layer).
    """

    def visit(ctx: LayerContext) -> None:
        n = len(ctx.prefix) + 1
        layer_ranks = {k[n:]: r for k, r in ranks.items() if k.startswith(ctx.prefix + ".")}
        if layer_ranks:
            method.compress_layer(ctx, layer_ranks)

    if not method.needs_calibration:
        input_ids = attention_mask = None
    seconds, records = walk_layers(model, spec, visit, input_ids, attention_mask, batch_size, device,
                                   MemoryStore(model) if store is None else store, type(method).__name__,
                                   progress, budget, write=True, timer=timer)
    modules: dict[str, dict] = {}
    guards: dict[str, dict] = {}
    for record in records:
        modules.update(record["modules"])
        guards.update(record["guards"])
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
    store: LayerStore | None = None  # where the layers are kept; None: in memory
    stats_cache: Any = None  # a rankdown.stats_cache.StatsCache (--stats-cache)

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = MemoryStore(self.model)

    @property
    def streamed(self) -> bool:
        """Whether the model is read layer by layer (never whole in memory)."""
        return self.store.streams

    def cached(self, kind: str, settings: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``compute()`` (a dict of tensors from a statistics pass), or the same from the statistics
        cache when a run of the same model, calibration and ``settings`` stored it."""
        if self.stats_cache is None:
            return compute()
        from rankdown.stats_cache import tensor_digest

        data = self.calibration()
        params = next(self.model.parameters())
        key = {"kind": kind, "settings": settings, "model": self.store.digest(),
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
        walk_layers(self.model, self.spec, guarded, ids, mask, self.batch_size, self.device, self.store,
                    "statistics", self.progress, self.budget)
