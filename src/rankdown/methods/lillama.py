"""Lillama: low-rank feature distillation (Sy, Cerisara, Illina 2025). docs/METHODS.md §4.

Weights are not low-rank but activations are: each linear starts as a low-rank factorisation (the
weight's SVD, or ROM's activation-aware factors) and the factors of one decoder layer are then
trained so that the layer's output matches the dense layer's output ``y`` on the calibration
tokens. Gradients never leave the layer: its inputs are cached activations.

Two inputs per layer (the engine only knows the second):
- teacher input: the dense model's hidden states entering the layer, carried from layer to layer
  in the walk's ``ctx.carry``: the dense layer's outputs on them are computed before the layer is
  replaced, kept in a :class:`~rankdown.storage.TensorStore` (RAM within ``--max-memory``, disk
  beyond), used as the distillation target ``y`` and handed to the next layer as its teacher input.
  Only one layer's dense weights ever exist beside the student's, and only while ``y`` is computed.
- student input: the outputs of the compressed layers before it (``ctx.layer_inputs()``).
The loss per token is ``mean_d |a − y| − log σ(cos(a, y))``, padding left out; ``teacher+student``
sums the losses of both paths.

**(choice)** Best checkpoint: the loss over all calibration batches is measured with the initial
factors and after every epoch, and the factors with the lowest one are kept, so distillation never
leaves a layer worse than its initialisation on the calibration data.

Under torchrun each optimizer step averages the gradients of one batch per process (weighted by
their real tokens): N processes at ``batch_size`` train as one process at ``N x batch_size``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rankdown import distributed
from rankdown.allocate import Target, uniform_ranks
from rankdown.config import ConfigError, MethodConfig, RunSettings, setting
from rankdown.linalg import svd_factors
from rankdown.methods.base import Method, install_factors, register
from rankdown.methods.rom import ROM, ROMConfig
from rankdown.nn.portable import LowRankLinear
from rankdown.storage import TensorStore

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext

log = logging.getLogger(__name__)


LILLAMA_STRATEGIES = ("bottom", "top", "uniform")
LILLAMA_INITS = ("svd", "rom")
LILLAMA_LOSSES = ("teacher+student", "teacher", "student")
TEACHER, TEACHER_OF = "lillama.teacher", "lillama.teacher_of"  # keys of the walk's ctx.carry


@dataclass
class LillamaConfig(MethodConfig):
    """Lillama (Sy, Cerisara, Illina 2025): SVD-initialised low-rank factors trained so each decoder
    layer's output matches the original's, gradients kept local to the layer."""

    method: ClassVar[str] = "lillama"
    allocations: ClassVar[tuple[str, ...]] = ("auto", "fisher", "strategy")
    strategy: str | None = setting(
        None,
        "with --allocation strategy: bottom (the default there; the paper's: matrices set to --min-rank from the first layer until the budget "
        "is met, later layers dense), top (the same from the last layer), uniform (one kept fraction everywhere)",
    )
    allocation: str = setting("auto", "auto (the default: fisher where it can run, else strategy), fisher (ranks where "
                         "they cost the loss least, see the shared --allocation) or strategy (the ranks --strategy gives)")
    min_rank: int | None = setting(None, "bottom/top: the rank a compressed matrix gets (default hidden_size/4)")
    init: str = setting("rom", "initial factors: rom (the default: ROM's activation-aware, uncentered factors) or svd "
                   "(the paper's plain weight SVD, ~10^6 x dense perplexity as a start on a pretrained model)")
    loss: str = setting("teacher+student", "which inputs the layer is trained on: teacher (the dense model's), student "
                   "(the compressed layers' before it) or teacher+student (both losses summed)")
    lr: float = setting(1e-4, "AdamW learning rate of the factors (measured on SmolLM2-135M from the rom start; the "
                   "paper's 8.6e-5 is for bf16 billion-parameter models)")
    epochs: int = setting(2, "passes over the calibration tokens per layer; the best of the initial and every "
                     "epoch's factors is kept")
    calib_tokens: int | None = setting(None, "calibration token budget: ceil(N/seqlen) windows of a text, or chat/JSONL "
                                  "records until N real tokens (default: --nsamples windows)")

    def validate(self) -> None:
        super().validate()
        if self.allocation in ("auto", "fisher") and (self.strategy is not None or self.min_rank is not None):
            raise ConfigError("--strategy and --min-rank choose lillama's ranks only with --allocation strategy; "
                              "add --allocation strategy, or drop them to keep the fisher allocation")
        for name, value, allowed in (("strategy", self.strategy or "bottom", LILLAMA_STRATEGIES),
                                     ("init", self.init, LILLAMA_INITS), ("loss", self.loss, LILLAMA_LOSSES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
        if self.min_rank is not None:
            if self.strategy == "uniform":
                raise ConfigError("min_rank is used by --strategy bottom or top, not uniform")
            if self.min_rank < 1:
                raise ConfigError(f"min_rank must be >= 1, got {self.min_rank}")
        if not self.lr > 0.0:
            raise ConfigError(f"lr must be > 0, got {self.lr} (e.g. --lr 1e-3)")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0 (0 keeps the initial factors), got {self.epochs}")
        if self.calib_tokens is not None and self.calib_tokens < 1:
            raise ConfigError(f"calib_tokens must be >= 1, got {self.calib_tokens}")


# ----------------------------------------------------------------------------- math
def token_loss(a: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of ``mean_d |a − y| − log σ(cos(a, y))``.

    a, y: (b, L, d); mask: (b, L) bool of real tokens, or None when all are real -> scalar.
    """
    per = (a - y).abs().mean(-1) - F.logsigmoid(F.cosine_similarity(a, y, dim=-1))
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def edge_ranks(
    targets: list[Target], total_params: int, ratio: float, min_rank: int, step: int, from_top: bool = False
) -> dict[str, int]:
    """Lillama's bottom/top allocation: walk the targets from the first layer (or the last), setting
    each to ``min_rank`` until ``ratio`` of ``total_params`` is removed; the matrix that would pass
    the budget takes the rank in ``min_rank + k·step`` (or stays dense) that lands nearest to it.
    Targets whose ``min_rank`` would not save parameters stay dense. Raises a :class:`ConfigError`
    when the ratio cannot be met to ±0.01.
    """
    need = ratio * total_params
    layers = sorted({t.layer for t in targets}, reverse=from_top)
    order = [t for layer in layers for t in targets if t.layer == layer]  # group order inside a layer
    ranks: dict[str, int] = {}
    removed = 0
    for t in order:
        if removed >= need:
            break
        if min_rank > t.cap():
            continue
        save = t.dense - t.cost(min_rank)
        if removed + save <= need:
            ranks[t.path] = min_rank
            removed += save
            continue
        options = [(need - removed, None)] + [
            (abs(need - removed - (t.dense - t.cost(r))), r) for r in range(min_rank, t.cap() + 1, step)]
        _, r = min(options, key=lambda o: o[0])
        if r is not None:
            ranks[t.path] = r
            removed += t.dense - t.cost(r)
        break
    achieved = removed / total_params
    if abs(achieved - ratio) > 0.01:
        most = sum(t.dense - t.cost(min_rank) for t in targets if min_rank <= t.cap()) / total_params
        raise ConfigError(
            f"ratio {ratio} cannot be met with every matrix at min_rank {min_rank} (that removes at most "
            f"{most:.3f}); lower --min-rank, use --strategy uniform, or a ratio up to {int(most * 100) / 100}")
    return ranks


# ----------------------------------------------------------------------------- method
@register
class Lillama(Method):
    """Lillama (docs/METHODS.md §4): ``strategy`` bottom (default), top or uniform; ``init`` svd or rom."""

    resumable = False  # the teacher's activations carry over from layer to layer

    config_class = LillamaConfig
    config: LillamaConfig
    order = 60
    auto_fallback = "strategy"

    default_batch_size = 4  # also the optimiser step: 32 windows give 8 steps a layer an epoch

    def __init__(self, config: LillamaConfig, run: RunSettings | None = None) -> None:
        super().__init__(config, run)
        self._progress = True
        self._last_layer: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._curves: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ allocation
    def plan(
        self, targets: list[Target], total_params: int, ratio: float, multiple: int,
        context: "PlanContext | None" = None,
    ) -> dict[str, int]:
        self._reset()
        self._progress = True if context is None else context.progress
        from rankdown.sensitivity import resolve

        cfg = self.config
        allocation = resolve(cfg.allocation, context, self.auto_fallback)
        if allocation == "fisher":
            from rankdown.sensitivity import fisher_ranks

            ranks = fisher_ranks(targets, total_params, ratio, multiple, context, fisher_tokens=cfg.fisher_tokens)
        elif (cfg.strategy or "bottom") == "uniform":
            ranks = uniform_ranks(targets, total_params, ratio, multiple)
        else:
            hidden = _hidden_size(context.model if context is not None else None, targets)
            step = max(1, hidden // 16)
            min_rank = cfg.min_rank or max(step, hidden // 4)
            ranks = edge_ranks(targets, total_params, ratio, min_rank, step, from_top=cfg.strategy == "top")
        chosen = [t.layer for t in targets if t.path in ranks]
        self._last_layer = max(chosen) if chosen else None
        log.info("lillama %s allocation: %d of %d matrices compressed, in layers %s",
                 "fisher" if allocation == "fisher" else cfg.strategy or "bottom", len(ranks),
                 len(targets), sorted(set(chosen)))
        return ranks

    # ------------------------------------------------------------------ one layer
    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        t0 = time.perf_counter()
        student = ctx.layer_inputs()
        # the dense outputs of layer teacher_of, handed on by its visit: this layer's teacher input
        teacher, teacher_of = ctx.carry.pop(TEACHER, None), ctx.carry.pop(TEACHER_OF, None)
        if teacher is not None and teacher_of == ctx.index - 1:
            teacher_in = teacher
        else:
            if teacher is not None:  # a dense layer in between: its teacher outputs were never computed
                log.warning("lillama: layer %d follows an uncompressed layer; its teacher input is the student's",
                            ctx.index)
                teacher.clear()
            teacher_in = student
        with ctx.timer.stage("distillation"):  # the dense teacher's outputs are the training's targets
            target = self._dense_outputs(ctx, teacher_in)  # before any module is replaced
        self._init_factors(ctx, ranks)
        with ctx.timer.stage("distillation"):
            self._curves[ctx.prefix] = self._distill(ctx, teacher_in, target)
        ctx.changed()  # trained in place: the next layer's inputs are the trained layer's outputs
        self._curves[ctx.prefix]["seconds"] = time.perf_counter() - t0
        if teacher_in is not student:
            teacher_in.clear()
        if self._last_layer is not None and ctx.index >= self._last_layer:
            target.clear()  # no later layer is compressed: its teacher input is not needed
        else:
            ctx.carry[TEACHER], ctx.carry[TEACHER_OF] = target, ctx.index

    @torch.no_grad()
    def _dense_outputs(self, ctx: "LayerContext", hidden: Any) -> TensorStore:
        out = ctx.new_store()
        for b in range(len(hidden)):
            out.append(ctx.call(hidden[b], b))
        return out

    def _init_factors(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        if self.config.init == "rom":  # uncentered: no bias is added, so the counts equal the svd init's
            ROM(ROMConfig(ratio=self.config.ratio, center=False, allocation="uniform")).compress_layer(ctx, ranks)
            return
        for name, r in ranks.items():
            W = ctx.module(name).weight.detach().to(ctx.device, torch.float64)
            A, B = svd_factors(W, r)
            install_factors(ctx, name, A, B)

    def _distill(self, ctx: "LayerContext", teacher_in: Any, target: TensorStore) -> dict[str, Any]:
        """Train the layer's low-rank factors on the calibration batches; returns the loss curves."""
        cfg = self.config
        layer = ctx.layer
        factors = [p for m in layer.modules() if isinstance(m, LowRankLinear) for p in (m.A.weight, m.B.weight)]
        dtype = next(layer.parameters()).dtype
        grad_flags = {p: p.requires_grad for p in layer.parameters()}
        student = ctx.layer_inputs()
        same = teacher_in is student  # teacher and student paths see the same inputs
        paths = {"teacher+student": ["teacher", "student"], "teacher": ["teacher"], "student": ["student"]}[cfg.loss]
        feeds = [student if p == "student" else teacher_in for p in paths]
        if same:
            feeds = feeds[:1]
        weight = len(paths) / len(feeds)  # one pass counts for both paths when they coincide

        def loss_of(b: int) -> torch.Tensor:
            y = target[b].to(ctx.device, torch.float32)
            mask = ctx.mask(b)
            return weight * sum(token_loss(ctx.call(feed[b], b, torch.float32), y, mask) for feed in feeds)

        @torch.no_grad()
        def full_loss() -> float:  # the mean over every process's batches under torchrun
            total, count = ctx.sum_over_processes([sum(float(loss_of(b)) for b in range(len(target))), len(target)])
            return total / max(1, count)

        def step(b: int) -> float:
            """Gradients of batch ``b`` (of every process's batch ``b`` under torchrun); the loss."""
            opt.zero_grad(set_to_none=True)
            if ctx.processes == 1:
                loss = loss_of(b)
                loss.backward()
                return loss.item()
            loss, tokens = None, 0  # a process with fewer batches sits this step out
            if b < len(target):
                loss = loss_of(b)
                loss.backward()
                mask = ctx.mask(b)
                tokens = int(mask.sum()) if mask is not None else target[b].shape[:-1].numel()
            return distributed.mean_gradients(factors, None if loss is None else loss.item(), tokens)

        curve: dict[str, Any] = {"train": [], "eval": [], "best_epoch": 0, "lr": cfg.lr}
        try:
            layer.float()
            for p in layer.parameters():
                p.requires_grad_(False)
            for p in factors:
                p.requires_grad_(True)
            best = full_loss()
            curve["eval"].append(best)
            best_state = [p.detach().clone() for p in factors]
            if cfg.epochs and factors:
                opt = torch.optim.AdamW(factors, lr=cfg.lr)
                gen = torch.Generator().manual_seed(self.run.seed * 100_003 + ctx.index)
                steps = ctx.most_batches()  # under torchrun: the most batches a process holds
                bar = tqdm(total=cfg.epochs * steps, desc=f"lillama {ctx.prefix}", unit="batch",
                           leave=False, disable=not self._progress)
                with torch.enable_grad(), bar:
                    for epoch in range(1, cfg.epochs + 1):
                        for b in torch.randperm(steps, generator=gen).tolist():
                            curve["train"].append(step(b))
                            opt.step()
                            bar.update(1)
                            bar.set_postfix(layer=ctx.index, epoch=epoch, loss=f"{curve['train'][-1]:.4f}")
                        value = full_loss()
                        curve["eval"].append(value)
                        log.info("lillama %s epoch %d: loss %.5f (initial %.5f)", ctx.prefix, epoch, value,
                                 curve["eval"][0])
                        if value < best:
                            best, curve["best_epoch"] = value, epoch
                            best_state = [p.detach().clone() for p in factors]
                with torch.no_grad():
                    for p, s in zip(factors, best_state):
                        p.copy_(s)
        finally:
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
                p.grad = None
            layer.to(dtype)
        return curve

    def artifacts(self) -> dict[str, Any]:
        return {"lillama_losses.json": self._curves} if self._curves else {}


# ----------------------------------------------------------------------------- helpers
def _hidden_size(model: Any, targets: list[Target]) -> int:
    cfg = getattr(model, "config", None)
    size = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or 0)
    if size:
        return size
    return Counter(t.in_features for t in targets).most_common(1)[0][0]  # the residual width, most often
