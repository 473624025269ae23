"""MoDeGPT: modular decomposition (Lin et al., ICLR 2025). docs/METHODS.md §3.

Pairs of matrices that meet in one inner dimension are compressed together, so that dimension
shrinks and no matrix is added: the compressed model is the same architecture, narrower.

- Type I, MLP (Nyström): keep the intermediate channels of top ridge leverage score of
  ``C_σ = Σ h hᵀ`` (the input of ``down``); gate/up (fc1) keep those rows, down is re-fitted.
- Type II, query–key (CR): per kv head, keep the query/key dimensions (RoPE pairs) of top
  ``‖C_q^½[:, j]‖·‖C_k^½[:, j]‖``, summed over the query heads of the group.
- Type III, value–output (SVD): per kv head, the rank-``r`` value–output product whitened by the
  attention input's correlation.

The attention becomes a :class:`~rankdown.nn.portable.ReducedAttention` (query/key head size
``d_qk``, value head size ``d_v``), the MLP linears :class:`~rankdown.nn.portable.ReducedLinear`.
Layer sparsities come from block influence (``1 − mean cos(x, y)`` of a layer's input and output);
in a layer of sparsity ``φ`` the query/key head size loses only ``qk_share·φ`` (0.25·φ by default, a
choice: see modegpt_alloc), the value head size and MLP width ``φ``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from rankdown.allocate import Target
from rankdown.arch import ArchSpec, UnsupportedModelError, norm_eps
from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import Guard, cholesky_lower_, guarded_eigh, mm64, release_tail, row_blocks, solve_cholesky_
from rankdown.methods.base import Method, register
from rankdown.methods.modegpt_alloc import QK_SHARE, LayerShape, block_influence_sparsity, solve_sparsity
from rankdown.nn.portable import ReducedAttention, ReducedLinear

if TYPE_CHECKING:
    from rankdown.engine import LayerContext, PlanContext
    from rankdown.stats import InputStats

log = logging.getLogger(__name__)


MODEGPT_ALLOCATIONS = ("block-influence", "uniform", "fisher")


@dataclass
class ModeGPTConfig(MethodConfig):
    """MoDeGPT (Lin et al. 2025): matrix pairs share a smaller inner dimension (MLP width, q/k and v head sizes)."""

    method: ClassVar[str] = "modegpt"
    allocations: ClassVar[tuple[str, ...]] = MODEGPT_ALLOCATIONS
    allocation: str = setting(
        "block-influence",
        "layer sparsity: block-influence (layers that change their input less lose more; one extra statistics "
        "pass over the dense model) or uniform (every layer loses the same fraction)",
    )
    epsilon: float = setting(0.1, "block-influence temperature ε of softmax(-s/ε): smaller concentrates sparsity more")
    cap: float = setting(0.9, "largest fraction of a module's inner dimension one layer may lose, in (0, 1)")
    ridge: float = setting(1e-2, "Nyström ridge λ of the MLP, as a fraction of the mean diagonal of its correlation")
    qk_share: float = setting(
        QK_SHARE,
        "fraction of a layer's sparsity that its query/key head size loses (the rest is paid by value/output "
        "and MLP); 1 is the paper's rule, 0.25 measured best on the reference model",
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.qk_share <= 1.0:
            raise ConfigError(f"qk_share must be in [0, 1] (1 = the paper's rule), got {self.qk_share}")
        if self.allocation not in MODEGPT_ALLOCATIONS:
            raise ConfigError(
                f"unknown allocation {self.allocation!r}; choose one of: {', '.join(MODEGPT_ALLOCATIONS)}"
            )
        if not self.epsilon > 0.0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0.0 < self.cap < 1.0:
            raise ConfigError(f"cap must be in (0, 1), got {self.cap}")
        if not self.ridge > 0.0:
            raise ConfigError(f"ridge must be > 0 (it keeps the Nyström inverse finite), got {self.ridge}")


EIG_FLOOR = 1e-6  # eigenvalues of the attention input correlation floored at this fraction of the largest


# ----------------------------------------------------------------------------- math
def psd_sqrt(C: torch.Tensor, floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor, Guard | None]:
    """``C^½`` and ``C^{-½}`` (d, d) of a symmetric PSD ``C`` (d, d), eigenvalues floored at ``floor·max``.

    The guard (value: the floor) is returned when some eigenvalue was below it.
    """
    evals, Q, _ = guarded_eigh(C)
    top = float(evals[0]) if evals.numel() else 0.0
    lo = floor * top if top > 0 else 1e-30
    guard = Guard("eigenvalue_floor", lo) if bool((evals < lo).any()) else None
    ev = evals.clamp_min(lo)
    return (Q * ev.sqrt()) @ Q.T, (Q * ev.rsqrt()) @ Q.T, guard


def ridge_leverage(C: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge leverage scores ``diag(C (C + λI)⁻¹)`` (n,) of a PSD ``C`` (n, n), in [0, 1)."""
    L, info = torch.linalg.cholesky_ex(C + lam * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
    if int(info) != 0:
        raise FloatingPointError("the correlation plus its ridge is not positive definite: it holds NaN or Inf")
    return 1.0 - lam * inverse_diag(L)


def inverse_diag(L: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``diag((L Lᵀ)⁻¹)`` (n,) of a lower-triangular ``L`` (n, n): the squared norms of ``L⁻¹``'s
    columns, solved for a block of columns at a time. Against the whole L: a corner ``L[a:, a:]``
    would need fewer operations but is copied by the solver (as large as L itself)."""
    n = L.shape[0]
    out = torch.empty(n, dtype=L.dtype, device=L.device)
    for a in range(0, n, block):
        b = min(block, n - a)
        E = torch.zeros(n, b, dtype=L.dtype, device=L.device)
        E[a : a + b].fill_diagonal_(1.0)
        out[a : a + b] = torch.linalg.solve_triangular(L, E, upper=False).square().sum(0)
    return out


def _lower_rows(L: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (ascending) of a lower-triangular ``L`` of which only the lower triangle is
    valid: (len(rows), rows[-1] + 1), the entries above each row's diagonal set to zero."""
    m = int(rows[-1]) + 1
    P = L[rows, :m]
    return P.masked_fill_(torch.arange(m, device=L.device)[None, :] > rows[:, None], 0.0)


def nystrom_mlp(
    W_down: torch.Tensor, C: torch.Tensor, k: int, ridge: float, scale: float = 1.0, consume: bool = False,
    block: int = 512, on_channels: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Guard]:
    """Type I: kept channels ``S`` (k,) ascending and the re-fitted down projection (d, k).

    W_down: (d, n) in any float dtype; C: (n, n) float64 correlation of the intermediate
    activations, times ``1/scale`` (the raw sum may be passed); only its lower triangle is read,
    the rest may be unwritten memory (:meth:`~rankdown.stats.InputStats.take_gram`). ``λ = ridge·mean diag(C)``; the
    channels are the top-k ridge leverage scores ``diag(C (C + λI)⁻¹)``, and
    ``W_down[:, all] C[:, S] (C[S, S] + λI)⁻¹`` is the ridge least-squares map from them to the
    full output. Channels that never fire score 0 and go first.

    Memory: one Cholesky factor ``C + λI = L Lᵀ``, made in C's own storage when ``consume`` (C is
    then destroyed, and freed before the end when the caller keeps no reference) and in its lower
    triangle only (:func:`~rankdown.linalg.cholesky_lower_`: the other half is never
    written, so never made resident), gives everything: the scores (1 − λ diag((L Lᵀ)⁻¹)), the
    rows ``(C + λI)[S, :] W_downᵀ = L[S] (W_down L)ᵀ`` (a block of W_down's rows at a time), and
    ``C[S, S] + λI = L[S] L[S]ᵀ``, of which only the lower triangle is formed, from its last row up,
    while the rows of L no longer needed are given back (:func:`~rankdown.linalg.release_tail`), so
    the two together never hold more than L did; that (k, k) matrix is then factorised in its own
    storage. So beyond C's lower half the working set is (k, d) and a few (block/2, n) blocks
    (measured on a 5632-channel MLP keeping 5336: 160 MB above C, against 194 MB with LAPACK's
    in-place Cholesky and a QR of ``L[S]ᵀ``, which write the other half). ``on_channels(S)`` is
    called as soon as the channels are chosen, before the refit's working set is made (MoDeGPT
    replaces the input projections there, so their full-width weights are not held through it).
    """
    mean_diag = float(C.diagonal().mean())
    lam = ridge * mean_diag if mean_diag > 0 else ridge
    L = C if consume else C.clone()
    del C  # when consumed, this frame may hold the last reference: C's storage then goes with L below
    L.diagonal().add_(lam)
    panel = max(1, block // 2)  # columns of a Cholesky panel; rows of L, W_down and T handled at once
    if cholesky_lower_(L, panel) != 0:
        raise FloatingPointError("the MLP correlation plus its ridge is not positive definite: it holds NaN or Inf")
    scores = 1.0 - lam * inverse_diag(L)
    S = torch.sort(torch.topk(scores, k).indices).values
    del scores
    if on_channels is not None:
        on_channels(S)
    n, d = L.shape[0], W_down.shape[0]
    Y = torch.empty(k, d, dtype=torch.float64, device=L.device)  # (C + λI)[S, :] W_downᵀ = L[S] (W_down L)ᵀ
    for r in range(0, d, panel):
        Wb = W_down[r : r + panel].to(device=L.device, dtype=torch.float64)
        T = torch.empty(Wb.shape[0], n, dtype=torch.float64, device=L.device)  # rows r.. of W_down L
        for c in range(0, n, panel):  # L's block column c is zero above row c
            torch.mm(Wb[:, c:], L[c:, c : c + panel], out=T[:, c : c + panel])
        del Wb
        for a in range(0, k, panel):
            P = _lower_rows(L, S[a : a + panel])
            Yb = Y[a : a + panel, r : r + panel]
            torch.mm(P, T[:, : P.shape[1]].T, out=Yb)
            del P
            # C[S, :] W_downᵀ = (C + λI)[S, :] W_downᵀ − λ W_down[:, S]ᵀ
            Yb.sub_(W_down[r : r + panel, S[a : a + panel].to(W_down.device)].T, alpha=lam)
        del T
    # C[S, S] + λI = L[S] L[S]ᵀ, its lower block triangle, from the last block row up: the rows of L
    # past the kept channels still to come are given back as it grows, so the two together never
    # hold more than L did
    G = torch.empty(k, k, dtype=torch.float64, device=L.device)
    for a in reversed(range(0, k, panel)):
        PI = _lower_rows(L, S[a : a + panel])
        for c in range(0, a + 1, panel):
            PJ = PI if c == a else _lower_rows(L, S[c : c + panel])
            torch.mm(PI[:, : PJ.shape[1]], PJ.T, out=G[a : a + panel, c : c + panel])
            del PJ
        del PI
        release_tail(L, int(S[a - 1]) + 1 if a else 0)  # L: C consumed, or a copy of it
    del L  # C's storage, the layer's largest matrix
    if cholesky_lower_(G, panel) != 0:
        raise FloatingPointError("the kept channels' correlation plus its ridge is not positive definite")
    solve_cholesky_(G, Y, panel)  # Y ← (C[S, S] + λI)⁻¹ Y
    return S, Y.T, Guard("nystrom_ridge", lam * scale)


def out_diag(W: torch.Tensor, b: torch.Tensor | None, second: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``diag E[(W x + b)(W x + b)ᵀ]`` (out,) in float64 from ``E[x xᵀ]`` (in, in) and ``E[x]`` (in,),
    float64. W: (out, in) in any float dtype, on their device, promoted a block of rows at a time."""
    d = torch.empty(W.shape[0], dtype=torch.float64, device=second.device)
    for a, Wb in row_blocks(W):
        rows = slice(a, a + Wb.shape[0])
        d[rows] = ((Wb @ second) * Wb).sum(1)
        if b is not None:
            d[rows] += 2 * b[rows] * (Wb @ mean) + b[rows].square()
    return d.clamp_min(0)


def qk_scores(dq: torch.Tensor, dk: torch.Tensor, rope: bool) -> torch.Tensor:
    """Type II scores per kv head: (kv_heads, head_dim/2) pair scores with RoPE, (kv_heads, head_dim) without.

    dq: (heads, head_dim), dk: (kv_heads, head_dim): diagonals of the per-head query/key
    correlations; ``‖C^½[:, j]‖ = √C_jj``. A query head's scores are summed into its kv head's group.
    """
    H, hd = dq.shape
    Hkv = dk.shape[0]
    s = (dq.sqrt().view(Hkv, H // Hkv, hd) * dk.sqrt()[:, None, :]).sum(1)
    return s[:, : hd // 2] + s[:, hd // 2 :] if rope else s


def kept_dims(scores: torch.Tensor, keep: int, rope: bool, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` entries of each row of ``scores`` (kv_heads, m), ascending -> (kept (kv_heads, keep),
    dimension indices within a head (kv_heads, 2·keep with RoPE, ordered ``[i..., i + head_dim/2...]``))."""
    kept = torch.sort(torch.topk(scores, keep, dim=1).indices, dim=1).values
    return kept, torch.cat([kept, kept + head_dim // 2], dim=1) if rope else kept


def vo_factors(
    C_half: torch.Tensor, C_ihalf: torch.Tensor, Wv: torch.Tensor, Wo: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Type III for one kv head: ``C^½ W_vᵀ = U Σ Vᵀ``; rank-``r`` SVD of ``Σ Vᵀ [W_o^1ᵀ … W_o^Gᵀ] ≈
    U_r Σ_r V_rᵀ``; new ``W_v = (C^{-½} U U_r)ᵀ`` and new ``W_o^h`` = block ``h`` of ``(Σ_r V_rᵀ)ᵀ``.

    C_half, C_ihalf: (d, d); Wv: (hd, d); Wo: (G, d, hd), the output columns of the G query heads
    reading this kv head -> Wv_new (r, d), Wo_new (G, d, r). Minimises the whitened error of all
    G heads' value–output products ``W_o^h W_v`` at once.
    """
    G, d, hd = Wo.shape
    U, S, Vh = torch.linalg.svd(C_half @ Wv.T, full_matrices=False)  # (d, hd), (hd,), (hd, hd)
    N = (S[:, None] * Vh) @ Wo.transpose(1, 2).permute(1, 0, 2).reshape(hd, G * d)  # (hd, G·d)
    U2, S2, V2h = torch.linalg.svd(N, full_matrices=False)
    Wv_new = (C_ihalf @ U @ U2[:, :r]).T
    Wo_new = (S2[:r, None] * V2h[:r]).T.reshape(G, d, r)
    return Wv_new, Wo_new


# ----------------------------------------------------------------------------- model geometry
@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def geometry(config: Any, attn: nn.Module) -> Geometry:
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(attn, "head_dim", None) or config.hidden_size // H
    return Geometry(config.hidden_size, H, Hkv, hd)


def check_supported(model: nn.Module, spec: ArchSpec) -> None:
    """Raise :class:`UnsupportedModelError` (naming the reason and what works instead) where MoDeGPT cannot go."""
    why = None
    if spec.observed:  # the generic path: no roles known
        why = spec.no_structured
    elif not spec.causal:
        why = "it is a bidirectional encoder; the reduced attention is written for causal decoders"
    elif spec.fused_qkv or len(spec.mlp_in) == 1 and spec.gated_mlp:
        why = "it fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj (no per-role selection yet)"
    elif spec.experts is not None:
        why = "its MLP is a mixture of experts (per-expert Nyström is not implemented)"
    elif getattr(model.config, "attn_logit_softcapping", None) is not None:
        why = "it caps attention logits (softcapping), which the reduced attention (SDPA) cannot do"
    elif spec.no_structured:
        why = spec.no_structured
    elif spec.attention is None:
        why = "its architecture entry names no attention module to rebuild"
    if why:
        raise UnsupportedModelError(
            f"--method modegpt does not support {spec.family}: {why}. Use --method rom or svd-llm, which support it"
        )
    _, layers = spec.find_layers(model)
    if any(isinstance(m, ReducedAttention) for m in layers.modules()):
        raise ConfigError("this model was already compressed by modegpt; compress the original model to a larger "
                          "ratio instead")


# ----------------------------------------------------------------------------- method
@register
class ModeGPT(Method):
    """MoDeGPT (docs/METHODS.md §3). Ranks handed to :meth:`compress_layer` are kept inner sizes: the
    query/key head size (q, k), the value head size (v, o) and the MLP width (gate, up, down)."""

    config_class = ModeGPTConfig
    config: ModeGPTConfig
    order = 50
    ranks_from_statistics = False  # kept channels and dimensions are chosen, not spanned by the data

    def __init__(self, config: ModeGPTConfig, run=None) -> None:
        super().__init__(config, run)
        self._allocation: dict[str, Any] = {}

    # ------------------------------------------------------------------ planning
    def plan(
        self, targets: list[Target], total_params: int, ratio: float, multiple: int,
        context: "PlanContext | None" = None,
    ) -> dict[str, int]:
        if context is None:
            raise ConfigError("modegpt plans on the model itself: call rankdown.compress()")
        model, spec = context.model, context.spec
        check_supported(model, spec)
        path, layers = spec.find_layers(model)
        geo = geometry(model.config, layers[0].get_submodule(spec.attention))
        names = {t.path for t in targets}
        share = self.config.qk_share
        shapes = [LayerShape.of(layer, f"{path}.{i}", i, spec, geo, names, multiple, share)
                  for i, layer in enumerate(layers)]
        shapes = [s for s in shapes if s.compressible]
        if not shapes:
            raise ConfigError("modegpt found no complete q/k, v/o or MLP pair to compress: check --exclude patterns")
        weights = None
        if self.config.allocation == "block-influence":
            influence = self.block_influence(context, {s.index for s in shapes})
            weights = block_influence_sparsity([influence[s.index] for s in shapes], self.config.epsilon)
            self._allocation["block_influence"] = {str(s.index): influence[s.index] for s in shapes}
        if self.config.allocation == "fisher":
            from rankdown.methods.modegpt_alloc import fisher_sparsity
            from rankdown.sensitivity import DEFAULT_SPECTRA_TOKENS, fisher_curves

            wanted = {t.path: t for t in targets}
            parts = [f"{s.prefix}.{n}" for s in shapes for n in (spec.q, spec.k, spec.o, spec.mlp_out)]
            curves = fisher_curves(context, [wanted[p] for p in parts if p in wanted], False,
                                   self.config.fisher_tokens, DEFAULT_SPECTRA_TOKENS)
            phis, size = fisher_sparsity(shapes, curves, total_params, ratio, self.config.cap)
        else:
            phis, size = solve_sparsity(shapes, weights, total_params, ratio, self.config.cap)
        self._allocation.update(allocation=self.config.allocation, sparsity={str(s.index): p for s, p in zip(shapes, phis)},
                                qk_share=share, params_after=size)
        ranks: dict[str, int] = {}
        for s, phi in zip(shapes, phis):
            ranks.update(s.ranks(1.0 - phi))
        log.info("modegpt: layer sparsity %s", ", ".join(f"{p:.3f}" for p in phis))
        return ranks

    def block_influence(self, context: "PlanContext", wanted: set[int]) -> dict[int, float]:
        """Layer index -> ``1 − mean_t cos(x_t, y_t)`` of the dense layer's input and output on real tokens."""
        out: dict[int, float] = {}

        def cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.cosine_similarity(x.to(torch.float64), y.to(torch.float64).to(x.device), dim=-1)

        def visit(ctx: "LayerContext") -> None:
            if ctx.index in wanted:  # over every process's batches under torchrun
                out[ctx.index] = 1.0 - ctx.mean_over_tokens(cos)

        context.walk_dense(visit)
        return out

    def artifacts(self) -> dict[str, Any]:
        return {"modegpt_allocation.json": self._allocation} if self._allocation else {}

    # ------------------------------------------------------------------ compression
    def compress_layer(self, ctx: "LayerContext", ranks: dict[str, int]) -> None:
        spec = ctx.spec
        if any(n in ranks for n in (spec.q, spec.k, spec.v, spec.o)):
            stats = ctx.collect_inputs([spec.q])[spec.q]
            self._attention(ctx, stats, ranks)
        mlp = [*spec.mlp_in, spec.mlp_out]
        if all(n in ranks for n in mlp):
            stats = ctx.collect_inputs([spec.mlp_out])[spec.mlp_out]
            self._mlp(ctx, stats, ranks[spec.mlp_out])

    def _attention(self, ctx: "LayerContext", stats, ranks: dict[str, int]) -> None:
        spec = ctx.spec
        attn = ctx.module(spec.attention)
        geo = geometry(attn.config, attn)
        H, Hkv, hd, d = geo.heads, geo.kv_heads, geo.head_dim, geo.hidden
        G = H // Hkv
        lin = {role: ctx.module(getattr(spec, role)) for role in "qkvo"}
        # the weights in their own dtype: kept query/key rows are copied as they are, and the float64
        # arithmetic promotes a block (out_diag) or a head group (Type III) at a time
        W = {role: m.weight.detach() for role, m in lin.items()}
        b = {role: None if m.bias is None else m.bias.detach().to(ctx.device, torch.float64) for role, m in lin.items()}
        mean = stats.mean
        second = stats.take_gram().div_(max(stats.n, 1))  # E[x xᵀ] in the statistics' own storage
        rope = spec.rope
        guards: list[Guard] = []

        # Type II: query/key dimensions, the same count in every head, pairs with RoPE
        if spec.q in ranks and spec.k in ranks:
            d_qk = ranks[spec.q]
            scores = qk_scores(out_diag(W["q"], b["q"], second, mean).view(H, hd),
                               out_diag(W["k"], b["k"], second, mean).view(Hkv, hd), rope)
            kept, dims = kept_dims(scores, d_qk // 2 if rope else d_qk, rope, hd)
        else:
            d_qk = hd
            kept = torch.arange(hd // 2, device=ctx.device).expand(Hkv, -1)
            dims = torch.arange(hd, device=ctx.device).expand(Hkv, -1)
        off = torch.arange(Hkv, device=ctx.device)[:, None] * hd
        k_rows = (dims + off).reshape(-1)
        q_rows = (dims.repeat_interleave(G, 0) + torch.arange(H, device=ctx.device)[:, None] * hd).reshape(-1)
        new = {"q": (W["q"][q_rows.to(W["q"].device)], None if b["q"] is None else b["q"][q_rows]),
               "k": (W["k"][k_rows.to(W["k"].device)], None if b["k"] is None else b["k"][k_rows])}

        # Type III: value/output per kv head, the value bias folded into the output bias (attention rows sum to 1)
        if spec.v in ranks and spec.o in ranks:
            r = ranks[spec.v]
            bo = b["o"]
            if b["v"] is not None:
                bv_heads = b["v"].view(Hkv, hd).repeat_interleave(G, 0).reshape(-1)  # per query head
                bo = (0 if bo is None else bo) + mm64(W["o"].to(ctx.device), bv_heads[:, None])[:, 0]
            C_half, C_ihalf, guard = psd_sqrt(second)
            del second
            guards += [guard] if guard else []
            Wv_new, Wo_new = [], torch.empty(d, H, r, dtype=torch.float64, device=ctx.device)
            Wo_heads = W["o"].view(d, H, hd)
            for g in range(Hkv):
                v_g, o_g = vo_factors(C_half, C_ihalf, W["v"][g * hd:(g + 1) * hd].to(ctx.device, torch.float64),
                                      Wo_heads[:, g * G:(g + 1) * G].permute(1, 0, 2).to(ctx.device, torch.float64), r)
                Wv_new.append(v_g)
                Wo_new[:, g * G:(g + 1) * G] = o_g.permute(1, 0, 2)
            new["v"] = (torch.cat(Wv_new), None)
            new["o"] = (Wo_new.reshape(d, H * r), bo)
        else:
            r = hd
            new["v"], new["o"] = (W["v"], b["v"]), (W["o"], b["o"])

        record = {
            "type": "attention", "hidden": d, "heads": H, "kv_heads": Hkv, "head_dim": hd, "qk_dim": d_qk, "v_dim": r,
            "scale": float(attn.scaling), "layer_idx": ctx.index if getattr(attn, "layer_idx", None) is None else int(attn.layer_idx),
            "causal": True, "rope": kept.tolist() if rope else None,
            "names": {role: getattr(spec, role)[len(spec.attention) + 1:] for role in "qkvo"},
            "bias": {role: new[role][1] is not None for role in "qkvo"},
            "qk_norm_eps": norm_eps(attn.q_norm) if spec.qk_norm else None,
            **({"qk_norm_offset": spec.norm_offset} if spec.qk_norm and spec.norm_offset else {}),
        }
        w0 = lin["q"].weight
        module = ReducedAttention(record, device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            for role in "qkvo":
                weight, bias = new[role]
                _check_finite(ctx, f"{spec.attention}.{role}", weight, bias)
                target = module.get_submodule(record["names"][role])
                target.weight.copy_(weight)
                if bias is not None:
                    target.bias.copy_(bias)
            if spec.qk_norm:
                module.q_norm.weight.copy_(attn.q_norm.weight)
                module.k_norm.weight.copy_(attn.k_norm.weight)
        ctx.replace(spec.attention, module)
        if guards:
            ctx.note(spec.attention, guards[0])

    def _mlp(self, ctx: "LayerContext", stats: "InputStats", k: int) -> None:
        spec = ctx.spec
        down = ctx.module(spec.mlp_out)
        # the raw sum, taken from the statistics and consumed: its only user, and the largest matrix
        # of the layer (intermediate²); freed when the factorisation returns, before the new modules
        w0 = down.weight

        @torch.no_grad()
        def keep_rows(S: torch.Tensor) -> None:  # the input projections keep their rows S
            for name in spec.mlp_in:
                old = ctx.module(name)
                new = ReducedLinear(old.in_features, k, bias=old.bias is not None, device=w0.device, dtype=w0.dtype)
                new.weight.copy_(old.weight[S.to(old.weight.device)])
                if old.bias is not None:
                    new.bias.copy_(old.bias[S.to(old.weight.device)])
                ctx.replace(name, new)
                del old

        S, W_new, guard = nystrom_mlp(down.weight.detach(), stats.take_gram(lower=True), k, self.config.ridge, 1.0 / max(stats.n, 1),
                                      consume=True, on_channels=keep_rows)
        _check_finite(ctx, spec.mlp_out, W_new, None)
        with torch.no_grad():
            new = ReducedLinear(k, down.out_features, bias=down.bias is not None, device=w0.device, dtype=w0.dtype)
            new.weight.copy_(W_new)
            if down.bias is not None:
                new.bias.copy_(down.bias)
        ctx.replace(spec.mlp_out, new)
        ctx.note(spec.mlp_out, guard)


def _check_finite(ctx: "LayerContext", name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise FloatingPointError(f"{ctx.prefix}.{name}: the decomposition produced NaN/Inf")


__all__ = ["ModeGPT", "check_supported", "kept_dims", "nystrom_mlp", "psd_sqrt", "qk_scores", "ridge_leverage",
           "vo_factors"]
