"""KFAC-SVD: each linear truncated in the norm of the Kronecker-factored Fisher, with ranks where
they cost the model's loss least (the method LEMS builds on, lems-svd/lems 2026). docs/METHODS.md §7.

For a linear ``y = W x`` (W: (out, in)) with ``g = ∂ℒ/∂y``, the second-order increase of the
calibration loss caused by a weight error ``ΔW`` is, with the K-FAC approximation
``E[(g ⊗ x)(g ⊗ x)ᵀ] ≈ E[g gᵀ] ⊗ E[x xᵀ]``,

    ½ tr(G ΔW A ΔWᵀ) = ½ ‖L_Gᵀ ΔW L_A‖²_F,     A = E[x xᵀ] = L_A L_Aᵀ,  G = E[g gᵀ] = L_G L_Gᵀ.

So the best rank-``r`` replacement is the truncated SVD of the whitened weight
``L_Gᵀ W L_A = U Σ Vᵀ``, un-whitened: ``B = L_G⁻ᵀ U_r Σ_r^½``, ``A' = Σ_r^½ V_rᵀ L_A⁻¹``; the loss
cost of rank ``r`` is ``½ Σ_{i>r} σ_i²``, in nats per token and in one currency for every linear.
The default allocation (``fisher``) minimises the summed cost under the parameter budget by
rankdown's water-filling (:func:`rankdown.allocate.global_ranks` on the curves σ_i², unnormalised):
the exact solution, up to the last step that fits, of the multiple-choice knapsack that LEMS solves
as an integer program, because each curve's kept part is concave along its hull. ``uniform`` is
the paper's baseline (one kept fraction everywhere).

As in the reference code, both statistics are shrunk towards a multiple of the identity of the
same trace (Ledoit–Wolf style): ``M ← (1 − α) M + α · mean(diag M) · I``, α = 0.1 for A, 0.3 for G;
G is summed over the middle positions of each sequence only (the first and last 12.5% dropped) with
per-token gradient norms clipped to [1/10, 10] × the sequence's mean. Linears fed the same tensor
(q/k/v; gate/up) share A. Everything is float64; a Cholesky factor that fails (α = 0 on a singular
matrix) gets a ridge, reported as a guard.

Memory: the backward pass keeps one (out, out) G per linear for the whole model at once, plus one
(in, in) A per input: 2.2 GB float64 on SmolLM2-135M (6.8 GB peak measured with the pass's
saved activations, batches of 8 × 256 tokens); on a 7B Llama (hidden 4096, MLP 11008, 32
layers) about 62 GB for gate/up's G (11008² · 8 B each), 21 GB for the other five linears' and
44 GB for the A's (down_proj's 11008² the most) — ~128 GB, so 7B needs the layer-wise backward
(one layer's G at a time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from rankdown.allocate import Target, check_reachable, global_ranks, uniform_ranks
from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import Guard
from rankdown.methods.base import Method, install_factors, register
from rankdown.stats import InputStats

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext

log = logging.getLogger(__name__)
INPUT_STATS = ("dense", "sequential")


@dataclass
class KFACConfig(MethodConfig):
    """KFAC-SVD: truncation in the Kronecker-factored Fisher norm ``‖L_Gᵀ ΔW L_A‖``, ranks by its
    loss estimate."""

    method: ClassVar[str] = "kfac"
    allocations: ClassVar[tuple[str, ...]] = ("fisher", "uniform")

    allocation: str = setting(
        "fisher",
        "rank allocation: fisher (the default: ranks minimising the summed K-FAC loss estimate ½ Σ σ_i² of the "
        "dropped whitened directions, water-filled under the budget), or uniform (one kept fraction everywhere)")
    fisher_tokens: int = setting(0, "calibration tokens the backward pass reads at most (0: all)")
    input_shrinkage: float = setting(
        0.1, "shrinkage α of the input covariance A towards mean(diag A)·I: A ← (1−α) A + α mean(diag A) I, in [0, 1)")
    grad_shrinkage: float = setting(
        0.3, "shrinkage α of the output-gradient covariance G towards mean(diag G)·I, in [0, 1)")
    grad_trim: float = setting(
        0.125, "fraction of each sequence's positions dropped at each end when summing G, in [0, 0.5)")
    grad_clip: float = setting(
        10.0, "per-token gradient norms clipped to [mean/c, mean·c] of their sequence before summing G (0: off)")
    input_stats: str = setting(
        "dense",
        "where A is measured: dense (the dense model, in the backward pass) or sequential (each layer fed the "
        "compressed layers before it, as svd-llm)")

    def validate(self) -> None:
        super().validate()
        for name in ("input_shrinkage", "grad_shrinkage"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.grad_trim, (int, float)) or not 0.0 <= self.grad_trim < 0.5:
            raise ConfigError(f"grad_trim must be in [0, 0.5), got {self.grad_trim!r}")
        if not isinstance(self.grad_clip, (int, float)) or not (self.grad_clip == 0 or self.grad_clip >= 1):
            raise ConfigError(f"grad_clip must be 0 (off) or >= 1, got {self.grad_clip!r}")
        if self.input_stats not in INPUT_STATS:
            raise ConfigError(f"unknown input_stats {self.input_stats!r}; choose one of: {', '.join(INPUT_STATS)}")


# ----------------------------------------------------------------------------- the mathematics
def shrunk_root(M: torch.Tensor, alpha: float, floor: float = 1e-10) -> tuple[torch.Tensor, Guard | None]:
    """Lower Cholesky factor L (d, d) float64 of ``(1 − α) M + α · mean(diag M) · I``, M: (d, d)
    symmetric PSD (its lower triangle is read), and any guard: a ridge ``ε · mean(diag M)`` added when
    the factorisation fails (ε from ``floor`` up, tenfold each time), or the identity when M is zero."""
    M = M.to(torch.float64)
    d = M.shape[0]
    scale = float(M.diagonal().mean()) if d else 0.0
    if not scale > 0.0 or not torch.isfinite(M.tril()).all():
        return torch.eye(d, dtype=torch.float64, device=M.device), Guard("no_statistics", 0.0)
    S = M.tril() * (1.0 - alpha)
    S.diagonal().add_(alpha * scale)
    L, info = torch.linalg.cholesky_ex(S)
    eps, guard = floor, None
    while int(info) != 0:
        if eps > 1.0:
            raise FloatingPointError("a K-FAC statistics matrix could not be made positive definite")
        S.diagonal().add_(eps * scale)
        guard = Guard("ridge", eps)
        L, info = torch.linalg.cholesky_ex(S)
        eps *= 10.0
    return L, guard


def whitened_svd(W: torch.Tensor, LA: torch.Tensor, LG: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD ``U, σ, Vᵀ`` of ``L_Gᵀ W L_A``; W: (out, in), LA: (in, in), LG: (out, out) lower."""
    return torch.linalg.svd(LG.T @ W.to(torch.float64) @ LA, full_matrices=False)


def kfac_factors(W: torch.Tensor, LA: torch.Tensor, LG: torch.Tensor, r: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A': (r, in), B: (out, r) float64 minimising ``‖L_Gᵀ (W − B A') L_A‖_F`` over rank ``r``, and the
    whitened σ² (k,) descending: the minimum is ``Σ_{i>r} σ_i²``."""
    U, s, Vh = whitened_svd(W, LA, LG)
    root = s[:r].sqrt()
    B = torch.linalg.solve_triangular(LG.T, U[:, :r] * root[None, :], upper=True)  # L_G⁻ᵀ U_r Σ_r^½
    A = torch.linalg.solve_triangular(LA, root[:, None] * Vh[:r], upper=False, left=False)  # Σ_r^½ V_rᵀ L_A⁻¹
    return A, B, s.square()


def kfac_error(W: torch.Tensor, What: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> float:
    """``tr(G ΔW A ΔWᵀ)``, ΔW = W − What: twice the K-FAC loss estimate of the replacement."""
    D = (W - What).to(torch.float64)
    return float(torch.trace(G.to(torch.float64) @ D @ A.to(torch.float64) @ D.T))


def kept_grad_rows(g: torch.Tensor, mask: torch.Tensor | None, trim: float, clip: float) -> torch.Tensor:
    """The rows of a gradient g (b, L, out) (or (n, out): an expert's routed tokens) that G sums:
    real tokens outside the first and last ``trim`` of each sequence's real positions, each token's
    norm clipped to [m/clip, m·clip] with m the mean non-zero norm of the kept tokens of its
    sequence (zero rows left alone; clip 0: none) -> (n, out)."""
    if g.dim() != 3:
        g = g.reshape(1, -1, g.shape[-1])
        keep = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
    else:
        keep = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device) if mask is None else mask.bool()
        pos = keep.long().cumsum(1) - 1  # index among the real tokens
        n = keep.sum(1, keepdim=True)
        cut = (n.to(torch.float64) * trim).floor().long()
        keep = keep & (pos >= cut) & (pos < n - cut)
    if clip > 0:
        norms = g.norm(dim=-1)
        live = keep & (norms > 1e-10)
        m = (norms * live).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp_min(1)
        target = torch.minimum(torch.maximum(norms, m / clip), m * clip)
        scale = torch.where(live, target / norms.clamp_min(1e-10), torch.ones_like(norms))
        g = g * scale[..., None]
    return g[keep]


# ----------------------------------------------------------------------------- the statistics pass
def input_owners(context: "PlanContext", targets: list[Target]) -> dict[str, str]:
    """path -> the path whose input statistics it shares: the first target of its group (a group's
    linears read the same tensor), itself for unfused experts (each sees its own routed tokens)."""
    paths = {t.path for t in targets}
    prefix, layers = context.spec.find_layers(context.model)
    owner = {}
    for i, layer in enumerate(layers):
        for group in context.spec.groups(layer):
            members = [f"{prefix}.{i}.{n}" for n in group if f"{prefix}.{i}.{n}" in paths]
            for p in members:
                owner[p] = p if context.spec.experts is not None else members[0]
    return {t.path: owner.get(t.path, t.path) for t in targets}


def kfac_statistics(context: "PlanContext", targets: list[Target], owners: dict[str, str], inputs: bool,
                    trim: float, clip: float, max_tokens: int = 0
                    ) -> tuple[dict[str, InputStats], dict[str, InputStats]]:
    """One forward and backward pass of the whole dense model over the calibration batches (the
    summed next-token cross-entropy; weights frozen, nothing changed) -> (owner path -> input
    statistics, when ``inputs``; path -> statistics of the trimmed, clipped output gradients).

    Modelled on :func:`rankdown.sensitivity.output_fisher`, which keeps only G's diagonal.
    The model must be in memory: the layer-wise backward of :mod:`rankdown.engine.backward` (which
    streams the fisher allocation) would let this pass hold one layer's G at a time; not done yet.
    """
    model = context.model
    data = context.calibration()
    ids, mask = data.input_ids, data.attention_mask
    if max_tokens > 0:
        rows = int((mask.sum(1).cumsum(0) < max_tokens).sum()) + 1
        ids, mask = ids[:rows], mask[:rows]
    device = torch.device(context.device)
    home = next(p.device for p in model.parameters())
    ins = {o: InputStats(t.in_features, device) for t in targets for o in [owners[t.path]] if o == t.path and inputs}
    grads = {t.path: InputStats(t.out_features, device) for t in targets}
    hooks, frozen = [], [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    current: list[torch.Tensor | None] = [None]  # the batch's mask

    def hook(path: str):
        def grad(g: torch.Tensor) -> None:
            grads[path].add(kept_grad_rows(g.detach(), current[0], trim, clip))

        def fwd(mod, args, out):
            if path in ins:
                x = args[0].detach()
                m = current[0]
                ins[path].add(x[m] if m is not None and x.shape[:2] == m.shape else x)
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    def leaf(mod, args, out):  # the graph starts at the embeddings' output: no weight gradient is made
        return out.detach().requires_grad_(True)

    try:
        model.eval()
        model.to(device)
        for p, _ in frozen:
            p.requires_grad_(False)
        hooks.append(model.get_input_embeddings().register_forward_hook(leaf))
        hooks += [model.get_submodule(t.path).register_forward_hook(hook(t.path)) for t in targets]
        with torch.enable_grad():
            for b in range(0, ids.shape[0], context.batch_size):
                x, m = ids[b : b + context.batch_size].to(device), mask[b : b + context.batch_size].to(device)
                current[0] = None if bool(m.all()) else m.bool()
                logits = model(input_ids=x, attention_mask=m, use_cache=False).logits[:, :-1]
                labels = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                loss.backward()
                del logits, loss
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.to(home)
        model.train(was_training)
    return ins, grads


def _moment(stats: InputStats) -> torch.Tensor:
    """``Σ v vᵀ / n`` (lower triangle valid), handed over from the statistics."""
    return stats.take_moment() if stats.n > 0 else torch.zeros(stats.dim, stats.dim, dtype=torch.float64)


def _merge(*guards: Guard | None) -> Guard | None:
    real = [g for g in guards if g is not None]
    if not real:
        return None
    return Guard("+".join(g.kind for g in real), max(g.value for g in real))


# ----------------------------------------------------------------------------- the method
@register
class KFAC(Method):
    config_class = KFACConfig
    config: KFACConfig
    needs_loss = True
    needs_gram = True
    resumable = False  # the statistics come from plan(), which a resumed run skips
    order = 35

    def __init__(self, config: KFACConfig, run=None) -> None:
        super().__init__(config, run)
        # dense statistics: the layer loop reads nothing; sequential: A from each layer's replayed inputs
        self.needs_calibration = config.input_stats == "sequential"
        self._LA: dict[str, tuple[torch.Tensor, Guard | None]] = {}  # owner path -> shrunk root of A
        self._LG: dict[str, tuple[torch.Tensor, Guard | None]] = {}  # path -> shrunk root of G
        self._owners: dict[str, str] = {}

    def plan(self, targets: list[Target], total_params: int, ratio: float, multiple: int,
             context: "PlanContext | None" = None) -> dict[str, int]:
        from rankdown.sensitivity import unavailable

        cfg = self.config
        why = unavailable(context)
        if why is not None:
            raise ConfigError(f"kfac takes gradients of the model's loss, which cannot run: {why}")
        check_reachable(targets, total_params, ratio, multiple)  # fail before the pass
        dense_a = cfg.input_stats == "dense" or cfg.allocation == "fisher"
        self._owners = input_owners(context, targets)
        ins, grads = kfac_statistics(context, targets, self._owners, dense_a, cfg.grad_trim, cfg.grad_clip,
                                     cfg.fisher_tokens)
        for path in list(grads):
            self._LG[path] = shrunk_root(_moment(grads.pop(path)), cfg.grad_shrinkage)
        for owner in list(ins):
            self._LA[owner] = shrunk_root(_moment(ins.pop(owner)), cfg.input_shrinkage)
        if cfg.allocation == "uniform":
            ranks = uniform_ranks(targets, total_params, ratio, multiple)
        else:
            curves = {t.path: self._sigma2(t.path, context.model.get_submodule(t.path).weight.detach())
                      for t in targets}
            ranks = global_ranks(targets, curves, total_params, ratio, multiple, normalise=False)
            cost = sum(float(curves[p][r:].sum()) for p, r in ranks.items())
            log.info("kfac allocation: predicted loss increase %.4f nats/token (K-FAC, second order, %d targets)",
                     0.5 * cost, len(ranks))
        if cfg.input_stats == "sequential":
            self._LA.clear()  # measured again in the layer loop, on the compressed upstream
        return ranks

    def _sigma2(self, path: str, W: torch.Tensor) -> torch.Tensor:
        LA, LG = self._LA[self._owners[path]][0], self._LG[path][0]
        return torch.linalg.svdvals(LG.T @ W.to(torch.float64) @ LA).square().cpu()

    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        if not self._LG:
            raise RuntimeError("kfac: no gradient statistics; plan() runs before the layer loop")
        for group in ctx.groups():
            names = [n for n in group if n in ranks]
            if not names:
                continue
            local: dict[str, tuple[torch.Tensor, Guard | None]] = {}
            if self.config.input_stats == "sequential":
                stats = ctx.collect_inputs(names, replay=True)
                for n in names:  # linears of one group share one statistics object
                    s = stats[n]
                    key = str(id(s))
                    if key not in local:
                        local[key] = shrunk_root(_moment(s), self.config.input_shrinkage)
                    local[n] = local[key]
            for name in names:
                path = f"{ctx.prefix}.{name}"
                W = ctx.module(name).weight.detach()
                LA, ga = local[name] if name in local else self._LA[self._owners[path]]
                LG, gg = self._LG.pop(path)
                A, B, _ = kfac_factors(W, LA.to(W.device), LG.to(W.device), ranks[name])
                install_factors(ctx, name, A, B, guard=_merge(ga, gg))
            if self.config.input_stats == "dense":
                for name in names:
                    self._LA.pop(self._owners[f"{ctx.prefix}.{name}"], None)
