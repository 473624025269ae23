"""The sequential layer loop (METHODS.md §0). The engine owns the loop; a method owns the math.

1. Capture what every layer is called with, per calibration batch: the first layer's hidden
   states and every layer's other arguments (attention masks, rotary cos/sin, position ids ...),
   by swapping each layer's ``forward`` for a recorder for one forward pass of the model. No layer
   computes anything in that pass, and layer-specific arguments (Gemma 2's sliding-window masks)
   are kept per layer.
2. For each layer in order, on the chosen device: the method compresses it, asking the engine for
   input statistics group by group (each group sees the outputs of the groups already compressed);
   then the compressed layer is run to produce the next layer's inputs. So every layer is calibrated
   on the errors made upstream.
Hooks are always removed, forwards always restored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from rankdown.arch import ArchSpec
from rankdown.methods.linalg import Guard
from rankdown.nn.portable import LowRankLinear
from rankdown.stats import InputStats

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a forward once everything needed from it has been seen."""


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
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

    hidden: list[torch.Tensor]  # per batch (b, L, d), on the storage device
    args: list[tuple]  # per batch: positional arguments after the hidden states
    kwargs: list[dict]  # per batch: keyword arguments
    masks: list[torch.Tensor | None]  # per batch (b, L) bool of real tokens, None when all real


@torch.no_grad()
def capture(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    batch_size: int, device: torch.device,
) -> tuple[list[torch.Tensor], list[list[tuple]], list[list[dict]], list[torch.Tensor | None]]:
    """Hidden states entering layer 0, and the other arguments of every layer, per batch.

    input_ids, attention_mask: (n, L). Returns hidden (per batch), args[layer][batch],
    kwargs[layer][batch], masks[batch]. Only the modules outside the layers compute.
    """
    n_layers = len(layers)
    hidden: list[torch.Tensor] = []
    args: list[list[tuple]] = [[] for _ in range(n_layers)]
    kwargs: list[list[dict]] = [[] for _ in range(n_layers)]

    def recorder(i: int) -> Callable:
        def forward(*a: Any, **kw: Any) -> Any:
            h = a[0] if a else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            args[i].append(to_device(tuple(a[1:]), "cpu"))
            kwargs[i].append(to_device(kw, "cpu"))
            if i == 0:
                hidden.append(h.detach().to("cpu"))
            if i == n_layers - 1:
                raise _StopForward
            return h

        return forward

    masks: list[torch.Tensor | None] = []
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for ids, am in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
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

    def groups(self) -> list[list[str]]:
        return self.spec.groups(self.layer)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def replace(self, name: str, new: nn.Module) -> None:
        self.layer.set_submodule(name, new)
        self.replaced[name] = module_spec(new)

    def note(self, name: str, guard: Guard) -> None:
        self.guards[name] = guard.to_dict()

    def _run(self, b: int) -> torch.Tensor:
        assert self.inputs is not None, "this method declared needs_calibration = False"
        h = self.inputs.hidden[b].to(self.device)
        out = self.layer(h, *to_device(self.inputs.args[b], self.device), **to_device(self.inputs.kwargs[b], self.device))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def collect_inputs(self, names: list[str], gram: bool = True) -> dict[str, InputStats]:
        """Float64 statistics of the inputs of the named linears over all calibration batches.

        Linears fed the same tensor (q, k, v) share one :class:`InputStats`. Padding rows are
        left out. Each batch's forward stops as soon as every named linear has been seen.
        """
        stats: dict[str, InputStats] = {}
        shared: dict[int, tuple[torch.Tensor, InputStats]] = {}
        seen: set[str] = set()
        mask: list[torch.Tensor | None] = [None]

        def hook(name: str) -> Callable:
            def pre(mod: nn.Module, a: tuple) -> None:
                x = a[0]
                hit = shared.get(id(x))
                if hit is not None and hit[0] is x:
                    stats[name] = hit[1]
                else:
                    s = stats.get(name) or InputStats(x.shape[-1], self.device, gram)
                    m = mask[0]
                    s.add(x[m] if m is not None and x.shape[:-1] == m.shape else x)
                    stats[name] = shared.setdefault(id(x), (x, s))[1]
                seen.add(name)
                if len(seen) == len(names):
                    raise _StopForward

            return pre

        handles = [self.module(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            for b in range(len(self.inputs.hidden)):
                shared.clear()
                seen.clear()
                m = self.inputs.masks[b]
                mask[0] = None if m is None else m.to(self.device)
                try:
                    self._run(b)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        for n in names:  # a linear that saw no token (an expert never routed to) gets empty stats
            if n not in stats:
                stats[n] = InputStats(self.module(n).in_features, self.device, gram)
        return stats

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs on every batch, on the CPU: the next layer's inputs."""
        return [self._run(b).to("cpu") for b in range(len(self.inputs.hidden))]


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
) -> tuple[dict[str, dict], dict[str, dict], list[float]]:
    """Compress ``model`` in place, layer by layer.

    ranks: full dotted path -> rank. Returns (structure modules: path -> record,
    guards: path -> guard, seconds per layer).
    """
    import time

    device = torch.device(device)
    path, layers = spec.find_layers(model)
    was_training = model.training
    model.eval()
    inputs = None
    try:
        if method.needs_calibration:
            _place_outside_layers(model, path, device)
            hidden, args, kwargs, masks = capture(model, layers, input_ids, attention_mask, batch_size, device)
        modules: dict[str, dict] = {}
        guards: dict[str, dict] = {}
        seconds: list[float] = []
        bar = tqdm(range(len(layers)), desc=f"{type(method).__name__}", unit="layer", disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            prefix = f"{path}.{i}"
            layer_ranks = {k[len(prefix) + 1 :]: r for k, r in ranks.items() if k.startswith(prefix + ".")}
            layer = layers[i]
            layer.to(device)
            if method.needs_calibration:
                inputs = LayerInputs(hidden, args[i], kwargs[i], masks)
            ctx = LayerContext(i, prefix, layer, spec, inputs, device)
            if layer_ranks:
                method.compress_layer(ctx, layer_ranks)
            if method.needs_calibration and i + 1 < len(layers):
                hidden = ctx.outputs()
            layer.to("cpu") if device.type != "cpu" else None
            modules.update({f"{prefix}.{k}": v for k, v in ctx.replaced.items()})
            guards.update({f"{prefix}.{k}": v for k, v in ctx.guards.items()})
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(layer=i, replaced=len(ctx.replaced), s=f"{seconds[-1]:.1f}")
            log.info("layer %d: %d modules replaced in %.2fs", i, len(ctx.replaced), seconds[-1])
    finally:
        if device.type != "cpu":
            model.to("cpu")
        model.train(was_training)
    return modules, guards, seconds


def _place_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the layer list to ``device`` (ties kept)."""
    if device.type == "cpu":
        return
    moved: dict[int, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for key, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
                mod._parameters[key] = moved[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[key] = b.to(device)
