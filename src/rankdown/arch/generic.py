"""The generic path: an :class:`ArchSpec` for a decoder whose family has no row, found by looking.

The layers are the model's repeated block list (the ``nn.ModuleList`` holding the most parameters
in blocks of one class); the linears of a layer are its ``nn.Linear`` (and GPT-2-style ``Conv1D``)
modules; and the groups, the linears that share an input, come from one forward of the first layer
with hooks: linears handed the same input tensor share a group, and the groups follow the order
in which the forward reached them. That is all the low-rank methods need; MoDeGPT, which rebuilds
the attention and needs to know its roles, refuses a spec found this way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rankdown.nn.portable import is_conv1d

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the hook on the first layer once it has run: the rest of the model is not needed."""


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The path and list of the model's decoder layers: of the ModuleLists of at least two blocks of
    one class, each holding a linear, the one with the most parameters."""
    best, size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(m) for m in mod}) != 1:
            continue
        if not any(_is_linear(m) for m in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > size:
            best, size = (name, mod), n
    return best


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def _acts_as_linear(mod: nn.Module, x: torch.Tensor, y) -> bool:
    """Whether the module's output ``y`` on ``x`` is ``x Wᵀ + b`` (an nn.Linear subclass may route
    instead: Llama 4's router returns scores and logits)."""
    if not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor) or y.shape[:-1] != x.shape[:-1]:
        return False
    w = mod.weight.t() if is_conv1d(mod) else mod.weight
    rows = x.reshape(-1, x.shape[-1])[:16].float()
    want = nn.functional.linear(rows, w.float(), None if mod.bias is None else mod.bias.float())
    return torch.allclose(y.reshape(-1, y.shape[-1])[:16].float(), want, rtol=1e-3, atol=1e-4)


def _linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The linears of a layer a method may replace (not the factors inside an earlier LowRankLinear)."""
    inside = {n for n, m in layer.named_modules() if type(m).__name__ == "LowRankLinear"}
    return {n: m for n, m in layer.named_modules()
            if n and _is_linear(m) and n.rsplit(".", 1)[0] not in inside}


def observe_groups(model: nn.Module, layer: nn.Module) -> list[list[str]]:
    """The linears of ``layer`` grouped by the input tensor they were handed in one forward of the
    model on a few tokens (stopped after ``layer``), in the order they ran. Linears the forward never
    reached (an unused expert) form groups of their own, after the others."""
    linears = _linears(layer)
    seen: dict[int, list[str]] = {}  # id of an input tensor -> linears that read it
    keep: list[torch.Tensor] = []  # the inputs, alive until the end: an id is unique only while its tensor lives
    odd: set[str] = set()  # nn.Linear subclasses that compute something else
    handles = []

    def hook(name: str):
        def fn(mod, args, out):
            x = args[0]
            if not _acts_as_linear(mod, x, out):
                odd.add(name)
                return
            if id(x) not in seen:
                keep.append(x)
                seen[id(x)] = []
            if name not in seen[id(x)]:
                seen[id(x)].append(name)
        return fn

    def stop(*_):
        raise _Stop

    try:
        for name, mod in linears.items():
            handles.append(mod.register_forward_hook(hook(name)))
        handles.append(layer.register_forward_hook(stop))
        device = next(p.device for p in model.parameters())
        ids = torch.arange(1, 9, device=device)[None] % max(2, int(getattr(model.config, "vocab_size", 2) or 2))
        with torch.no_grad():
            try:
                model(input_ids=ids)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    groups = [[n for n in names if n not in odd] for names in seen.values()]
    met = {n for g in groups for n in g} | odd
    groups += [[n] for n in linears if n not in met]
    return [g for g in groups if g]


def generic_spec(model: nn.Module, model_type: str, supported: list[str]) -> "ArchSpec | None":
    """An ArchSpec found by looking at ``model``, or None where no repeated block list holds linears."""
    from rankdown.arch import ArchSpec

    found = repeated_blocks(model)
    if found is None:
        return None
    path, layers = found
    if any(p.device.type == "meta" for p in layers[0].parameters()):
        from rankdown.arch import UnsupportedModelError

        raise UnsupportedModelError(
            f"model_type {model_type!r} has no row in rankdown's table; the generic path finds its linears with "
            "one forward, which needs the weights in memory: compress it in memory (--no-stream)")
    groups = observe_groups(model, layers[0])
    spec = ArchSpec(
        model_type, (model_type,), layers=(path,), q="", k="", v="", o="", mlp_in=(), mlp_out="",
        conv1d=any(is_conv1d(m) for m in layers[0].modules()), observed=tuple(tuple(g) for g in groups),
        no_structured=("it has no row in rankdown's table (it runs on the generic path) and the reduced attention "
                       f"needs one; modegpt supports: {', '.join(supported)}"),
    )
    log.warning("model_type %r has no row in rankdown's table: it runs on the generic path (%d layers at %s; "
                "%d linears per layer in %d groups sharing an input, found with hooks in one forward)",
                model_type, len(layers), path, sum(len(g) for g in groups), len(groups))
    return spec
