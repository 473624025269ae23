"""Where a compression's time goes: wall seconds per stage, and as multiples of one dense forward.

A :class:`Stages` is passed through one run (the engine's contexts hold it; the report keeps what it
measured); there is no global state. Stages nest, and time is counted *exclusively*: while an inner
stage runs, the outer one's clock stops, so the stages of a run sum to its wall time. The stages a
compression reports (see :func:`rankdown.api.compress`):

- ``calibration``: reading and tokenizing the calibration text (nothing when tokens are given);
- ``forward``: the calibration forward: the capture of layer 0's inputs (embeddings) and every pass of
  a layer that only produces the next layer's inputs (after a layer is compressed, or dense in a
  method that needs no statistics);
- ``statistics``: the passes of a layer with statistics hooks and what they accumulate (Gram
  matrices, output covariances; the forward of that pass is counted here, not under ``forward``);
- ``allocation``: the method's ``plan``: its own statistics walk over the dense model (ROM's spectra,
  MoDeGPT's and SVD-LLM's scores), fisher's backward, the rank search;
- ``decompositions``: the rest of each layer's visit: eigen/singular-value decompositions, solves,
  building and installing the factors;
- ``distillation``: Lillama's training of the factors (its dense-teacher passes included);
- ``save``: writing the compressed model (in memory runs; a streamed run writes shard by shard
  inside the layer loop, counted under ``other``);
- ``other``: what none of these holds (finding the targets, counting parameters; streamed: reading
  and writing the layers).

The unit is one dense forward over the same calibration tokens at the same batch size, measured in
the same run before anything is compressed (see :func:`rankdown.api.compress`'s ``cost``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

STAGES = ("calibration", "forward", "statistics", "allocation", "decompositions", "distillation", "save", "other")
_PAUSED = ""  # a stack entry whose time is counted nowhere


class Stages:
    """Wall seconds per named stage, exclusive of the stages nested inside (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = clock
        self._stack: list[str] = []
        self._since = 0.0

    def _switch(self) -> None:
        now = self._clock()
        if self._stack and self._stack[-1] != _PAUSED:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the time inside (less that of the stages opened within) as ``name``'s."""
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is counted under no stage (a measurement that is not part of the run)."""
        with self.stage(_PAUSED):
            yield

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` spent elsewhere (e.g. by a caller, after the run) as ``name``'s."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def cost_table(seconds: dict[str, float], unit: float | None) -> dict[str, dict[str, float | None]]:
    """Per stage (in :data:`STAGES` order, then any other, then ``total``): seconds and the multiple
    of ``unit`` (one dense forward's seconds; None when it was not measured)."""
    names = [n for n in STAGES if n in seconds] + sorted(n for n in seconds if n not in STAGES)
    rows = {n: seconds[n] for n in names}
    rows["total"] = sum(rows.values())
    return {n: {"seconds": round(s, 4), "forwards": None if not unit else round(s / unit, 3)} for n, s in rows.items()}


def cost_record(seconds: dict[str, float], unit: float | None, unit_kind: str | None) -> dict[str, Any]:
    """What a report carries as ``cost``: the unit, how it was measured, and the table."""
    return {"forward_seconds": None if unit is None else round(unit, 4), "forward": unit_kind,
            "stages": cost_table(seconds, unit)}


@torch.no_grad()
def dense_forward(model: Any, spec: Any, data: Any, batch_size: int, device: Any, store: Any,
                  budget: Any) -> tuple[float, str]:
    """Seconds of one dense forward over the calibration tokens in batches of ``batch_size``, and what
    was run: in memory on the model's own device, the model's forward (embeddings, layers, norm and
    head; the logits dropped batch by batch); otherwise (streamed, or compressing on another device)
    the engine's layer-by-layer pass with nothing collected (embeddings and layers; streamed: each
    layer read from disk; a resumed streamed run reads its finished layers compressed)."""
    from rankdown.engine import walk_layers

    t0 = time.perf_counter()
    params = next(model.parameters())
    if not store.streams and params.device == device:
        was_training = model.training
        model.eval()
        try:
            for i in range(0, data.input_ids.shape[0], batch_size):
                ids = data.input_ids[i:i + batch_size].to(device)
                mask = data.attention_mask[i:i + batch_size].to(device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            model.train(was_training)
        return time.perf_counter() - t0, "model forward (in memory)"
    walk_layers(model, spec, lambda ctx: None, data.input_ids, data.attention_mask, batch_size, device, store,
                "forward", False, budget)
    return time.perf_counter() - t0, "layer-by-layer pass (streamed)" if store.streams else "layer-by-layer pass"
