"""What every layer is called with, per calibration batch (docs/METHODS.md §0, step 1).

The first layer's hidden states and every layer's other arguments (attention masks, rotary
cos/sin, position ids ...) are recorded by swapping each layer's ``forward`` for a recorder for one
forward pass of the model. No layer computes anything in that pass, and layer-specific arguments
(Gemma 2's sliding-window masks) are kept per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from rankdown import distributed
from rankdown.storage import TensorStore


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


def cast(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``obj`` with every tensor moved to ``device`` and every floating one cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast(v, device, dtype) for k, v in obj.items()}
    return obj


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
