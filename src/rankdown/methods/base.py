"""The contract between the engine and a method: the engine owns the loop, a method the math.

A method is one file in ``rankdown/methods/``: its config (a :class:`~rankdown.config.MethodConfig`
subclass), its :class:`Method` subclass marked ``@register``, and its mathematics. The package
imports every module in its folder, so a new file is all it takes for the library, the CLI and the
benchmark to offer the method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rankdown.allocate import Target, uniform_ranks
from rankdown.config import MethodConfig, RunSettings
from rankdown.linalg import Guard
from rankdown.nn.portable import LowRankLinear
from rankdown.stats import InputStats

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext


def lowrank_from(
    linear: nn.Linear, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
) -> LowRankLinear:
    """A :class:`LowRankLinear` with factors A (r, in), B (out, r) in the dtype/device of ``linear``.

    B's bias is ``bias`` (out,) when given, else the linear's own bias (if any).
    """
    w = linear.weight
    bias = linear.bias if bias is None else bias
    new = LowRankLinear(
        linear.in_features, linear.out_features, A.shape[0], bias=bias is not None,
        device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        new.A.weight.copy_(A)
        new.B.weight.copy_(B)
        if bias is not None:
            new.B.bias.copy_(bias)
    return new


def install_factors(
    ctx: "LayerContext", name: str, A: torch.Tensor, B: torch.Tensor,
    bias: torch.Tensor | None = None, guard: Guard | None = None,
) -> None:
    """Replace linear ``name`` of the layer by ``B @ A`` (+ ``bias``), refusing NaN/Inf factors."""
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise FloatingPointError(f"{ctx.prefix}.{name}: factors contain NaN/Inf")
    ctx.replace(name, lowrank_from(ctx.module(name), A, B, bias))
    if guard is not None:
        ctx.note(name, guard)


REGISTRY: dict[str, type["Method"]] = {}  # method name -> class, filled by @register on import


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: offer ``cls`` under its config's ``method`` name (a second class of the same
    name is a mistake: two files would claim one name)."""
    name = cls.config_class.method
    if not name:
        raise TypeError(f"{cls.__name__}.config_class {cls.config_class.__name__} sets no `method` name")
    other = REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name {name!r} is claimed by both {other.__module__}.{other.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}")
    REGISTRY[name] = cls
    return cls


class Method:
    """Base of every method. Subclasses set ``config_class`` and override what they need.

    The default :meth:`compress_layer` walks the layer's groups in order
    (``[q,k,v] -> [o] -> [mlp in] -> [mlp out]``); for each group it asks the engine for the input
    statistics of the group's targets (on inputs that already went through the compressed groups
    before), then replaces each target by the factors :meth:`factorize` returns.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_calibration: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = True  # whether factorize() reads the (in, in) input correlation
    # whether a killed streaming run can continue after its last finished layer: true when nothing
    # but the layer's own inputs carries over from one layer to the next
    resumable: ClassVar[bool] = True
    # whether each rank is a number of directions the calibration statistics must span (so fewer
    # calibration tokens than the rank is refused); not so for kept channels (MoDeGPT's MLP width)
    ranks_from_statistics: ClassVar[bool] = True
    # whether the method takes gradients of the model's loss (FWSVD's row weights): the model needs a
    # language-modelling head (a streamed model gets them layer by layer, rankdown/engine/backward.py)
    needs_loss: ClassVar[bool] = False
    # what allocation "auto" runs where the fisher allocation cannot (no language-modelling head)
    auto_fallback: ClassVar[str] = "uniform"
    # calibration sequences per forward pass when RunSettings.batch_size leaves it open
    default_batch_size: ClassVar[int] = 8
    # position in lists of methods (CLI choices, demo, bench default): baselines first
    order: ClassVar[int] = 100

    def __init__(self, config: MethodConfig, run: RunSettings | None = None) -> None:
        self.config = config
        self.run = run if run is not None else RunSettings()

    @classmethod
    def reads_calibration(cls, config: MethodConfig) -> bool:
        """Whether compressing with ``config`` reads calibration text at all: in the layer loop, or
        in planning (a loss gradient, the fisher allocation)."""
        return cls.needs_calibration or cls.needs_loss or config.allocation == "fisher"

    @property
    def batch_size(self) -> int:
        """Calibration sequences per forward pass: the run's, or this method's default."""
        return self.run.batch_size or self.default_batch_size

    def factorize(
        self, W: torch.Tensor, stats: InputStats | None, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
        """W: (out, in), the module's own weight (its dtype: promote it to float64 as needed, a
        block at a time where it is large) -> A: (r, in), B: (out, r), and any guard needed."""
        raise TypeError(f"{type(self).__name__} defines neither factorize() nor compress_layer()")

    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        """Compress the linears of one layer; ``ranks`` maps paths inside the layer to ranks."""
        for group in ctx.groups():
            names = [n for n in group if n in ranks]
            if not names:
                continue
            stats = ctx.collect_inputs(names, gram=self.needs_gram, replay=True) if self.needs_calibration else {}
            for name in names:
                linear = ctx.module(name)
                A, B, guard = self.factorize(linear.weight.detach(), stats.get(name), ranks[name])
                install_factors(ctx, name, A, B, guard=guard)

    def artifacts(self) -> dict[str, Any]:
        """JSON files to save beside the compressed model, name -> JSON value (e.g. loss curves).

        Read by :func:`rankdown.compress` after the layer loop; default none.
        """
        return {}

    def allocation_record(self, context: "PlanContext | None") -> dict[str, Any] | None:
        """The allocation :meth:`plan` runs with ``context`` (the saved record's ``allocation``):
        ``{"allocation": what ran}``, with ``"requested"`` and ``"fallback_because"`` when ``auto``
        resolved; None for a method without allocations."""
        requested = getattr(self.config, "allocation", None)
        if requested is None:
            return None
        from rankdown.sensitivity import resolution

        ran, why = resolution(requested, context, self.auto_fallback)
        out: dict[str, Any] = {"allocation": ran}
        if ran != requested:
            out["requested"] = requested
        if why is not None:
            out["fallback_because"] = why
        return out

    def plan(
        self, targets: list[Target], total_params: int, ratio: float, multiple: int,
        context: "PlanContext | None" = None,
    ) -> dict[str, int]:
        """Ranks for the target paths to compress; a target left out stays dense.

        Default: one kept-parameter fraction for all, as the baselines. ``context`` lets a method
        run a statistics pass over the dense model first (see :class:`rankdown.engine.PlanContext`).
        """
        if self.config.allocation == "fisher":
            from rankdown.sensitivity import fisher_ranks

            return fisher_ranks(targets, total_params, ratio, multiple, context,
                                fisher_tokens=self.config.fisher_tokens)
        return uniform_ranks(targets, total_params, ratio, multiple)
