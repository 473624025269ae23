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
choice: see modegpt_alloc), the value head size and MLP width ``φ``. The decompositions are in
modegpt_math; here a layer is rebuilt: every MLP of it (the dense one, each expert on its routed
tokens, a shared expert) and its attention (fused roles sliced, q/k whole where normed or partly rotated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rankdown.allocate import Target
from rankdown.arch import ArchSpec, UnsupportedModelError, norm_eps
from rankdown.config import ConfigError, MethodConfig, setting
from rankdown.linalg import Guard, mm64
from rankdown.methods.base import Method, register
from rankdown.methods.modegpt_alloc import QK_SHARE, LayerShape, block_influence_sparsity, role_keys, solve_sparsity
from rankdown.methods.modegpt_math import (  # noqa: F401  (re-exported: the decompositions' home before the split)
    EIG_FLOOR, inverse_diag, kept_dims, nystrom_mlp, out_diag, psd_sqrt, qk_scores, ridge_leverage, vo_factors,
)
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


# ----------------------------------------------------------------------------- model geometry
@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dimensions of a head that RoPE rotates (Phi-4-mini: 3/4 of them)


def geometry(config: Any, attn: nn.Module) -> Geometry:
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(attn, "head_dim", None) or config.hidden_size // H
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) or 1.0
    return Geometry(config.hidden_size, H, Hkv, hd, int(hd * factor))


def check_supported(model: nn.Module, spec: ArchSpec) -> None:
    """Raise :class:`UnsupportedModelError` (naming the reason and what works instead) where MoDeGPT cannot go."""
    why = spec.no_structured
    if not why and spec.attention is None:
        why = "its architecture entry names no attention module to rebuild"
    if not why and getattr(model.config, "position_embedding_type", "absolute") not in (None, "absolute"):
        why = (f"its attention adds relative position scores ({model.config.position_embedding_type}), "
               "which the reduced attention does not compute")
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
            parts = dict.fromkeys(f"{s.prefix}.{n}" for s in shapes for n in (spec.q, spec.k, spec.o, *(m.out for m in s.mlps)))
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
        if any(n in ranks for n in role_keys(spec).values()):
            stats = ctx.collect_inputs([spec.q])[spec.q]
            self._attention(ctx, stats, ranks)
        # the dense MLP, or every expert and the shared expert: each its own Nyström on the tokens it saw
        mlps = [(ins, out) for ins, out in spec.mlps(ctx.layer) if all(n in ranks for n in (*ins, out))]
        if mlps:
            stats = ctx.collect_inputs([out for _, out in mlps])
            for ins, out in mlps:
                self._mlp(ctx, ins, out, stats.pop(out), ranks[out])

    def _attention(self, ctx: "LayerContext", stats, ranks: dict[str, int]) -> None:
        spec, keys = ctx.spec, role_keys(ctx.spec)
        attn = ctx.module(spec.attention)
        geo = geometry(attn.config, attn)
        H, Hkv, hd, d = geo.heads, geo.kv_heads, geo.head_dim, geo.hidden
        G = H // Hkv
        # the weights in their own dtype: kept query/key rows are copied as they are, and the float64
        # arithmetic promotes a block (out_diag) or a head group (Type III) at a time
        W, b = _role_weights(ctx, geo)
        mean = stats.mean
        second = stats.take_gram().div_(max(stats.n, 1))  # E[x xᵀ] in the statistics' own storage
        rope = spec.rope and bool(getattr(attn, "use_rope", True))  # SmolLM3's NoPE layers: use_rope 0
        guards: list[Guard] = []

        # Type II: query/key dimensions, the same count in every head, pairs with RoPE
        if keys["q"] in ranks and keys["k"] in ranks:
            d_qk = ranks[keys["q"]]
            scores = qk_scores(out_diag(W["q"], b["q"], second, mean).view(H, hd),
                               out_diag(W["k"], b["k"], second, mean).view(Hkv, hd), rope)
            kept, dims = kept_dims(scores, d_qk // 2 if rope else d_qk, rope, hd)
        else:
            d_qk = hd
            kept = torch.arange(geo.rotary_dim // 2, device=ctx.device).expand(Hkv, -1)
            dims = torch.arange(hd, device=ctx.device).expand(Hkv, -1)
        off = torch.arange(Hkv, device=ctx.device)[:, None] * hd
        k_rows = (dims + off).reshape(-1)
        q_rows = (dims.repeat_interleave(G, 0) + torch.arange(H, device=ctx.device)[:, None] * hd).reshape(-1)
        new = {"q": (W["q"][q_rows.to(W["q"].device)], None if b["q"] is None else b["q"][q_rows]),
               "k": (W["k"][k_rows.to(W["k"].device)], None if b["k"] is None else b["k"][k_rows])}

        # Type III: value/output per kv head, the value bias folded into the output bias (attention rows sum to 1)
        if keys["v"] in ranks and keys["o"] in ranks:
            r = ranks[keys["v"]]
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

        # the roles inside the attention module (BERT's output projection is outside it, replaced on its own)
        if spec.fused_qkv:  # one qkv linear, as the original's (GPT-2's keeps its name: its Conv1D conversion is recorded)
            inside = {"qkv": _inner_name(spec, "q"), "o": _inner_name(spec, "o")}
            has_bias = {"qkv": any(new[role][1] is not None for role in "qkv"), "o": new["o"][1] is not None}
        else:
            inside = {role: _inner_name(spec, role) for role in "qkvo" if _inner_name(spec, role)}
            has_bias = {role: new[role][1] is not None for role in inside}
        softcap = getattr(attn.config, "attn_logit_softcapping", None)
        record = {
            "type": "attention", "hidden": d, "heads": H, "kv_heads": Hkv, "head_dim": hd, "qk_dim": d_qk, "v_dim": r,
            "scale": float(attn.scaling), "layer_idx": ctx.index if getattr(attn, "layer_idx", None) is None else int(attn.layer_idx),
            "causal": spec.causal, "rope": kept.tolist() if rope else None, "names": inside,
            "bias": has_bias,
            "qk_norm_eps": norm_eps(attn.q_norm) if spec.qk_norm else None,
            **({"qk_norm_offset": spec.norm_offset} if spec.qk_norm and spec.norm_offset else {}),
            **({"qk_norm_all": True} if spec.qk_norm_all else {}),
            **({"rotary_dim": geo.rotary_dim} if rope and geo.rotary_dim < hd else {}),
            **({"softcap": float(softcap)} if softcap is not None else {}),
        }
        w0 = W["q"]
        module = ReducedAttention(record, device=w0.device, dtype=w0.dtype)
        rows, at = {"q": H * d_qk, "k": Hkv * d_qk, "v": Hkv * r}, 0
        with torch.no_grad():
            for role in "qkvo":
                weight, bias = new[role]
                _check_finite(ctx, f"{spec.attention}.{role}", weight, bias)
                if role in rows and spec.fused_qkv:  # its block of rows in the one qkv linear
                    target, sl = module.get_submodule(inside["qkv"]), slice(at, at + rows[role])
                    at += rows[role]
                    target.weight[sl].copy_(weight)
                    if target.bias is not None:
                        target.bias[sl].copy_(bias) if bias is not None else target.bias[sl].zero_()
                    continue
                if role in inside:
                    target = module.get_submodule(inside[role])
                elif r < hd:  # an output projection outside the attention module: its reduced input
                    target = ReducedLinear(H * r, d, bias=bias is not None, device=w0.device, dtype=w0.dtype)
                else:
                    continue
                target.weight.copy_(weight)
                if bias is not None:
                    target.bias.copy_(bias)
                if role not in inside:
                    ctx.replace(spec.o, target)
            if spec.qk_norm:
                module.q_norm.weight.copy_(attn.q_norm.weight)
                module.k_norm.weight.copy_(attn.k_norm.weight)
        ctx.replace(spec.attention, module)
        if guards:
            ctx.note(spec.attention, guards[0])

    def _mlp(self, ctx: "LayerContext", ins: tuple[str, ...], out: str, stats: "InputStats", k: int) -> None:
        down = ctx.module(out)
        w0 = down.weight
        width = down.in_features

        @torch.no_grad()
        def keep_rows(S: torch.Tensor) -> None:  # the input projections keep their rows S (per block of a fused gate_up)
            for name in ins:
                old = ctx.module(name)
                blocks = old.out_features // width
                rows = S if blocks == 1 else torch.cat([S + j * width for j in range(blocks)])
                new = ReducedLinear(old.in_features, blocks * k, bias=old.bias is not None, device=w0.device,
                                    dtype=w0.dtype)
                new.weight.copy_(old.weight[rows.to(old.weight.device)])
                if old.bias is not None:
                    new.bias.copy_(old.bias[rows.to(old.weight.device)])
                ctx.replace(name, new)
                del old

        if stats.n == 0:  # an expert no calibration token was routed to: its largest channels, down kept as is
            S, W_new = _by_weight(ctx, ins, down, k)
            keep_rows(S)
            guard = Guard("expert_without_tokens", 0.0)
        else:
            # the raw sum, taken from the statistics and consumed: its only user, and the largest matrix
            # of the layer (intermediate²); freed when the factorisation returns, before the new modules
            S, W_new, guard = nystrom_mlp(down.weight.detach(), stats.take_gram(lower=True), k, self.config.ridge,
                                          1.0 / max(stats.n, 1), consume=True, on_channels=keep_rows)
        _check_finite(ctx, out, W_new, None)
        with torch.no_grad():
            new = ReducedLinear(k, down.out_features, bias=down.bias is not None, device=w0.device, dtype=w0.dtype)
            new.weight.copy_(W_new)
            if down.bias is not None:
                new.bias.copy_(down.bias)
        ctx.replace(out, new)
        ctx.note(out, guard)


def _inner_name(spec: ArchSpec, role: str) -> str:
    """The name of role's linear inside the rebuilt attention ('' when it lies outside the attention module)."""
    path = getattr(spec, role)
    return path[len(spec.attention) + 1:] if path.startswith(spec.attention + ".") else ""


def _role_weights(ctx: "LayerContext", geo: Geometry) -> tuple[dict, dict]:
    """Weights (own dtype) and float64 biases (on the device) of q, k, v, o; rows of one fused qkv linear."""
    spec = ctx.spec
    if spec.fused_qkv:  # Phi-3, GPT-2: [q (heads·hd); k (kv_heads·hd); v (kv_heads·hd)]; GPT-NeoX: per head
        fused, q, kv, hd = ctx.module(spec.q), geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim, geo.head_dim
        rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
        if spec.qkv_per_head:
            head = torch.arange(hd, device=fused.weight.device)
            rows = {r: (torch.arange(geo.heads, device=head.device)[:, None] * 3 * hd + j * hd + head).reshape(-1)
                    for j, r in enumerate("qkv")}
        parts = {role: (fused.weight[sl], None if fused.bias is None else fused.bias[sl]) for role, sl in rows.items()}
        o = ctx.module(spec.o)
        parts["o"] = (o.weight, o.bias)
    else:
        parts = {role: (m.weight, m.bias) for role, m in ((r, ctx.module(getattr(spec, r))) for r in "qkvo")}
    W = {role: w.detach() for role, (w, _) in parts.items()}
    b = {role: None if bias is None else bias.detach().to(ctx.device, torch.float64) for role, (_, bias) in parts.items()}
    return W, b


def _by_weight(ctx: "LayerContext", ins: tuple[str, ...], down: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Without data: the ``k`` channels of largest ``‖W_down[:, i]‖·Π‖W_in[i]‖`` (ascending) and down's kept columns."""
    width = down.in_features
    score = down.weight.detach().double().norm(dim=0)
    for name in ins:
        w = ctx.module(name).weight.detach().double()
        for j in range(w.shape[0] // width):
            score = score * w[j * width:(j + 1) * width].norm(dim=1)
    S = torch.sort(torch.topk(score, k).indices).values
    return S, down.weight.detach()[:, S.to(down.weight.device)]


def _check_finite(ctx: "LayerContext", name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise FloatingPointError(f"{ctx.prefix}.{name}: the decomposition produced NaN/Inf")


__all__ = ["ModeGPT", "check_supported", "kept_dims", "nystrom_mlp", "psd_sqrt", "qk_scores", "ridge_leverage",
           "vo_factors"]
