"""The loss gradient at the linears' outputs, one layer in memory at a time (docs/METHODS.md §6.3).

The fisher allocation needs ``g = ∂L/∂y`` at every target linear's output ``y``. A backward pass of
the whole model holds every weight and every layer's activations at once; a streamed model is never
whole in memory. The same gradients, layer by layer:

1. Capture what every layer is called with (capture.py), then run the layers forward in order,
   keeping each layer's input hidden states per batch (in RAM within the run's memory budget, on
   disk beyond it, as the layer loop keeps its activations).
2. The loss: the model's own forward with every layer stubbed out (the last one returns the kept
   final hidden states), so whatever the family does after its layers (final norm, head, logit
   soft-capping) is what runs; its summed next-token cross-entropy, and its gradient at the final
   hidden states.
3. Backward through the layers in reverse, one layer loaded at a time: each is run again from its
   kept input with grad enabled, the output gradient is pushed through it, hooks on the target
   linears' outputs see their gradients, and the gradient at the layer's input is handed to the
   layer below.

Weights are frozen throughout: no weight gradient is built. Peak memory: one layer, the output head,
and the activations (two stores of gradients plus the kept inputs, within the budget).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rankdown import distributed
from rankdown.arch import ArchSpec
from rankdown.engine.capture import _place_outside_layers, capture, to_device
from rankdown.storage import LayerStore, MemoryBudget, TensorStore

log = logging.getLogger(__name__)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _like(out: Any, h: torch.Tensor) -> Any:
    """``h`` in the form a layer returns its hidden states (a tensor, or a tuple starting with it)."""
    return (h, *[None] * (len(out) - 1)) if isinstance(out, tuple) else h


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def output_gradients(
    model: nn.Module, spec: ArchSpec, store: LayerStore, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    batch_size: int, device: torch.device | str, on_gradient: dict[str, Callable[[torch.Tensor], None]],
    budget: MemoryBudget | None = None, progress: bool = True,
) -> int:
    """Feed ``on_gradient[path](g)`` the loss gradient at the output of every linear named (full
    dotted paths inside the layers), batch by batch, layer by layer from the last; return the number
    of predicted tokens (summed over the processes under torchrun, which share the batches).

    The loss is the summed next-token cross-entropy of the model's logits over the real tokens.
    """
    device = torch.device(device)
    path, layers = spec.find_layers(model)
    n = len(layers)
    per_layer: dict[int, dict[str, str]] = {}
    for full in on_gradient:
        i, _, name = full[len(path) + 1:].partition(".")
        per_layer.setdefault(int(i), {})[name] = full
    own_budget = budget is None
    budget = MemoryBudget() if budget is None else budget
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    kept: list[TensorStore] = []  # kept[i]: layer i's input per batch; kept[n]: the final hidden states
    grads: TensorStore | None = None
    tokens = 0
    store.begin(device)
    model.eval()
    try:
        store.load_outside()
        _place_outside_layers(model, path, device)
        hidden, args, kwargs, masks = capture(model, layers, input_ids, attention_mask, batch_size, device,
                                              TensorStore(budget))
        store.drop_outside()
        kept.append(hidden)
        shape: list[Any] = [None]  # what the last layer returns (a tensor or a tuple)
        bar = tqdm(total=2 * n, desc="fisher", unit="layer", disable=not progress)
        with torch.no_grad():
            for i in range(n):
                layer = _load(store, i, layers[i], device)
                out = TensorStore(budget)
                for b in range(len(hidden)):
                    y = layers[i](kept[i][b].to(device), *to_device(args[i][b], device),
                                  **to_device(kwargs[i][b], device))
                    shape[0] = y
                    out.append(_first(y))
                    del y
                store.commit(i, layer, None)
                kept.append(out)
                bar.update()
        grads, tokens = _head_gradients(model, spec, store, kept[n], input_ids, attention_mask, batch_size, device,
                                        budget, shape[0])
        kept.pop().clear()
        for i in reversed(range(n)):
            layer = _load(store, i, layers[i], device)
            lower = TensorStore(budget) if i > 0 else None
            hooks = [layer.get_submodule(name).register_forward_hook(_hook(on_gradient[full]))
                     for name, full in per_layer.get(i, {}).items()]
            try:
                for b in range(len(grads)):
                    with torch.enable_grad():
                        x = kept[i][b].to(device).detach().requires_grad_(True)
                        y = _first(layer(x, *to_device(args[i][b], device), **to_device(kwargs[i][b], device)))
                        (gx,) = torch.autograd.grad(y, x, grads[b].to(device))
                    if lower is not None:
                        lower.append(gx)
                    del x, y, gx
            finally:
                for h in hooks:
                    h.remove()
            store.commit(i, layer, None)
            grads.clear()
            grads = lower
            kept.pop().clear()
            bar.update()
        bar.close()
    finally:
        for s in kept:
            s.clear()
        if grads is not None:
            grads.clear()
        store.end()
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        model.train(was_training)
        if own_budget:
            budget.cleanup()
    return int(distributed.all_sum([tokens])[0])


def _load(store: LayerStore, i: int, layer: nn.Module, device: torch.device) -> nn.Module:
    if store.load(i, layer) is not None:
        raise RuntimeError(f"layer {i} was compressed already: the loss gradients are those of the dense model")
    _freeze(layer)
    return layer.to(device)


def _hook(on_gradient: Callable[[torch.Tensor], None]) -> Callable:
    def forward(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: on_gradient(g.detach()))

    return forward


def _head_gradients(
    model: nn.Module, spec: ArchSpec, store: LayerStore, final: TensorStore, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, batch_size: int, device: torch.device, budget: MemoryBudget, shape: Any,
) -> tuple[TensorStore, int]:
    """The gradient of the summed next-token loss at the final hidden states, per batch, and the
    number of predicted tokens: the model's forward with its layers stubbed out."""
    path, layers = spec.find_layers(model)
    n = len(layers)
    grads = TensorStore(budget)
    tokens = 0
    head = model.get_output_embeddings()
    current: list[torch.Tensor | None] = [None]

    def passthrough(i: int) -> Callable:
        def forward(*a: Any, **kw: Any) -> Any:
            if i == n - 1:
                return _like(shape, current[0])
            return _like(shape, a[0] if a else kw["hidden_states"])

        return forward

    store.load_outside(head=True)
    try:
        _freeze(model)
        _place_outside_layers(model, path, device)
        home = next(head.parameters()).device
        head.to(device)
        for i, layer in enumerate(layers):
            layer.forward = passthrough(i)
        batches = distributed.shard(list(zip(input_ids.split(batch_size), attention_mask.split(batch_size))))
        for b, (ids, am) in enumerate(batches):
            x, m = ids.to(device), am.to(device)
            with torch.enable_grad():
                h = final[b].to(device).detach().requires_grad_(True)
                current[0] = h
                logits = model(input_ids=x, attention_mask=m, use_cache=False).logits[:, :-1]
                labels = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                (g,) = torch.autograd.grad(loss, h)
            grads.append(g)
            tokens += int((labels != -100).sum())
            current[0] = None
            del logits, loss, g, h
        head.to(home)
    except BaseException:
        grads.clear()
        raise
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        store.drop_outside()
    return grads, tokens
