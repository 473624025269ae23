"""MoDeGPT's budgets (docs/METHODS.md §3.4): layer sparsities -> kept inner sizes.

A layer of sparsity ``φ`` keeps the fraction ``1 − φ`` of its MLP width (rounded to ``multiple``)
and of its value head size, and ``1 − qk_share·φ`` of its query/key head size (RoPE pairs).
**(choice)** ``qk_share`` = :data:`QK_SHARE` = 0.25 by default; 1 is the paper's rule (every module
loses ``φ``). A query/key dimension saves as many parameters as a value dimension but changes every
attention logit, and selection (no re-fit) has little to choose from in a small head (16 rotary
pairs at head size 32). On the reference model at 30% (block influence, 32 calibration windows, 40
held-out) the paper's rule gives held-out perplexity 36.69, ``qk_share`` 0.25 35.47 (svd: 35.70).
0, 0.25, 0.5 and 1 were measured at 10–50%, 0.35 at 30–50%: 0.25 is the best or within 0.2 of it
up to 40%; at 50% 0.5 is better (42.86 against 43.96). What q/k keep is paid for by the value/output
and the MLP: the solved ``φ`` rises.

Layer sparsities are ``φ_l = L · φ_avg · w_l`` (``w = softmax(−s/ε)`` of the block influences
``s``, or uniform), capped with the excess re-spread on the others; ``φ_avg`` is solved by bisection
on the exact parameter count after rounding, so the asked ratio is met to ±0.01.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankdown.arch import ArchSpec
from rankdown.config import ConfigError


QK_SHARE = 0.25  # fraction of a layer's sparsity its query/key head size loses (1: the paper's)


def _round(x: float, unit: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x / unit) * unit)))


def _numel(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def role_keys(spec: ArchSpec) -> dict[str, str]:
    """Role -> the key of its kept size in a layer's ranks: the linear's path, or with q/k/v fused in one
    linear (Phi-3) that path marked ``#qk`` (query/key head size) or ``#v`` (value head size)."""
    if spec.fused_qkv:
        return {"q": f"{spec.q}#qk", "k": f"{spec.q}#qk", "v": f"{spec.v}#v", "o": spec.o}
    return {role: getattr(spec, role) for role in "qkvo"}


@dataclass(frozen=True)
class Mlp:
    """One MLP of a layer (the dense MLP, a routed expert, a shared expert) whose width Type I shrinks."""

    ins: tuple[str, ...]  # input projections (gate, up; or up; or one fused gate_up)
    out: str  # output projection (down)
    width: int
    rows: int  # rows of the input projections per channel: 2 gated (gate and up, or fused), 1 otherwise
    in_bias: bool
    out_bias: bool
    dense: int  # parameters of its linears now

    def params(self, k: int, d: int) -> int:
        """Parameters at width ``k``, hidden size ``d``."""
        return self.rows * (d * k + (k if self.in_bias else 0)) + k * d + (d if self.out_bias else 0)


def layer_mlps(layer: nn.Module, spec: ArchSpec) -> list[Mlp]:
    """The MLPs of one layer (see :meth:`ArchSpec.mlps`)."""
    out = []
    for ins, name in spec.mlps(layer):
        down = layer.get_submodule(name)
        first = layer.get_submodule(ins[0])
        rows = sum(layer.get_submodule(n).out_features for n in ins) // down.in_features
        out.append(Mlp(ins, name, down.in_features, rows, first.bias is not None, down.bias is not None,
                       sum(_numel(layer.get_submodule(n)) for n in (*ins, name))))
    return out


@dataclass(frozen=True)
class LayerShape:
    """What MoDeGPT can shrink in one decoder layer, and what it costs at a kept fraction."""

    index: int
    prefix: str
    spec: ArchSpec
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool  # this layer's attention rotates queries and keys (not a NoPE layer)
    qk: bool  # Type II applies (q and k are targets, no q/k norm, RoPE on the whole head or none)
    vo: bool  # Type III applies
    mlps: tuple[Mlp, ...]  # Type I applies to each (every name a target)
    bias: tuple[bool, bool, bool, bool]  # q, k, v, o
    dense: dict[str, int]  # "qk", "vo", "mlp" -> parameters of those linears now
    multiple: int
    qk_share: float = 1.0  # the query/key head size loses qk_share·φ at layer sparsity φ

    @classmethod
    def of(cls, layer: nn.Module, prefix: str, index: int, spec: ArchSpec, geo: Any, targets: set[str],
           multiple: int, qk_share: float = 1.0) -> "LayerShape":
        def has(*names: str) -> bool:
            return all(f"{prefix}.{n}" in targets for n in names)

        mods = {role: layer.get_submodule(getattr(spec, role)) for role in "qkvo"}
        attn = layer.get_submodule(spec.attention)
        rope = spec.rope and bool(getattr(attn, "use_rope", True))  # SmolLM3's NoPE layers: use_rope 0
        bias = tuple(mods[r].bias is not None for r in "qkvo")
        if spec.fused_qkv:  # one linear: its rows by role, (in + bias) parameters each
            per_row = geo.hidden + (1 if bias[0] else 0)
            qk_dense = (geo.heads + geo.kv_heads) * geo.head_dim * per_row
            vo_dense = geo.kv_heads * geo.head_dim * per_row + _numel(mods["o"])
        else:
            qk_dense, vo_dense = _numel(mods["q"]) + _numel(mods["k"]), _numel(mods["v"]) + _numel(mods["o"])
        mlps = tuple(m for m in layer_mlps(layer, spec) if has(*m.ins, m.out))
        return cls(
            index, prefix, spec, geo.hidden, geo.heads, geo.kv_heads, geo.head_dim, rope,
            qk=has(spec.q, spec.k) and not spec.qk_norm and geo.rotary_dim == geo.head_dim, vo=has(spec.v, spec.o),
            mlps=mlps, bias=bias, dense={"qk": qk_dense, "vo": vo_dense, "mlp": sum(m.dense for m in mlps)},
            multiple=multiple, qk_share=qk_share,
        )

    @property
    def compressible(self) -> bool:
        return self.qk or self.vo or bool(self.mlps)

    def sizes(self, keep: float) -> dict[str, int]:
        """Kept sizes at kept fraction ``keep`` (= 1 − φ): "qk" (head size, at ``1 − qk_share·φ``), "v" (value
        head size), and per MLP its output projection's path (width); a part that is not compressed (or would
        keep everything) is left out."""
        hd, unit = self.head_dim, self.multiple if self.head_dim >= 4 * self.multiple else 1
        out = {}
        if self.qk:
            keep_qk = 1.0 - self.qk_share * (1.0 - keep)
            if self.rope:
                qk = 2 * _round(keep_qk * hd / 2, max(1, unit // 2), 1, hd // 2)
            else:
                qk = _round(keep_qk * hd, unit, 1, hd)
            if qk < hd:
                out["qk"] = qk
        if self.vo:
            r = _round(keep * hd, unit, 1, hd)
            if r < hd:
                out["v"] = r
        for m in self.mlps:
            k = _round(keep * m.width, self.multiple, min(self.multiple, m.width), m.width)
            if k < m.width:
                out[m.out] = k
        return out

    def params(self, keep: float) -> int:
        """Parameters of this layer's compressible linears at kept fraction ``keep``."""
        s, d, H, Hkv = self.sizes(keep), self.hidden, self.heads, self.kv_heads
        qb, kb, vb, ob = self.bias
        n = self.dense["qk"] + self.dense["vo"] + self.dense["mlp"]
        if "qk" in s:
            q = s["qk"]
            n += d * H * q + (H * q if qb else 0) + d * Hkv * q + (Hkv * q if kb else 0) - self.dense["qk"]
        if "v" in s:  # the value bias is folded into the output bias
            r = s["v"]
            n += d * Hkv * r + H * r * d + (d if ob or vb else 0) - self.dense["vo"]
        for m in self.mlps:
            if m.out in s:
                n += m.params(s[m.out], d) - m.dense
        return n

    @property
    def dense_params(self) -> int:
        return self.dense["qk"] + self.dense["vo"] + self.dense["mlp"]

    def ranks(self, keep: float) -> dict[str, int]:
        """Full target path (or role key, :func:`role_keys`) -> kept inner size, for the parts compressed at ``keep``."""
        s, p, keys = self.sizes(keep), self.prefix, role_keys(self.spec)
        out = {}
        if "qk" in s:
            out.update({f"{p}.{keys['q']}": s["qk"], f"{p}.{keys['k']}": s["qk"]})
        if "v" in s:
            out.update({f"{p}.{keys['v']}": s["v"], f"{p}.{keys['o']}": s["v"]})
        for m in self.mlps:
            if m.out in s:
                out.update({f"{p}.{n}": s[m.out] for n in (*m.ins, m.out)})
        return out


def block_influence_sparsity(influence: list[float], epsilon: float) -> list[float]:
    """``softmax(−s/ε)`` (sums to 1): the share of the sparsity each layer takes; low influence, more."""
    s = torch.tensor(influence, dtype=torch.float64)
    return torch.softmax(-s / epsilon, dim=0).tolist()


def spread(phi: list[float], weights: list[float], cap: float) -> list[float]:
    """``phi`` with every value above ``cap`` set to it and the excess re-spread on the others in
    proportion to ``weights``, until none is above (or all are at the cap)."""
    phi = list(phi)
    for _ in range(len(phi)):
        excess = sum(p - cap for p in phi if p > cap)
        if excess <= 1e-15:
            break
        phi = [min(p, cap) for p in phi]
        free = [i for i, p in enumerate(phi) if p < cap]
        if not free:
            break
        wsum = sum(weights[i] for i in free)
        for i in free:
            phi[i] += excess * (weights[i] / wsum if wsum > 0 else 1.0 / len(free))
    return [min(p, cap) for p in phi]


def solve_sparsity(
    shapes: list[LayerShape], weights: list[float] | None, total_params: int, ratio: float, cap: float
) -> tuple[list[float], int]:
    """Layer sparsities (one per shape) and the model's size after, meeting ``ratio`` to ±0.01.

    weights: the block-influence shares (sum 1), or None for uniform. Raises :class:`ConfigError`
    naming the reachable range when the ratio cannot be met.
    """
    L = len(shapes)
    goal = total_params * (1.0 - ratio)

    def phis(a: float) -> list[float]:
        if weights is None:
            return [min(a, cap)] * L
        return spread([L * a * w for w in weights], weights, cap)

    def size(ps: list[float]) -> int:
        return total_params - sum(s.dense_params - s.params(1.0 - p) for s, p in zip(shapes, ps))

    smallest = size(phis(cap))
    if smallest > goal + 0.01 * total_params:
        best = 1.0 - smallest / total_params
        raise ConfigError(
            f"ratio {ratio} cannot be reached by modegpt: with every layer at the sparsity cap {cap} it removes "
            f"at most {best:.3f} of the parameters (embeddings stay whole); use --ratio in "
            f"(0, {math.floor(best * 100) / 100}] or raise --cap"
        )
    lo, hi = 0.0, cap
    for _ in range(60):
        mid = (lo + hi) / 2
        if size(phis(mid)) > goal:
            lo = mid
        else:
            hi = mid
    a = min((lo, hi), key=lambda x: abs(size(phis(x)) - goal))
    ps = phis(a)
    achieved = 1.0 - size(ps) / total_params
    if abs(achieved - ratio) > 0.01:
        raise ConfigError(
            f"ratio {ratio} can only be approximated to {achieved:.4f} by modegpt with sizes rounded to multiples "
            f"of {shapes[0].multiple}; pass --rank-multiple 1, or a ratio closer to {achieved:.2f}"
        )
    return ps, size(ps)


# grid of layer sparsities the fisher allocation chooses from
FISHER_STEP = 0.025


def _tail(curve: torch.Tensor, keep: float) -> float:
    """Loss cost of keeping the fraction ``keep`` of a loss-weighted spectrum's directions."""
    r = int(round(keep * len(curve)))
    return float(curve[r:].sum())


def layer_cost(shape: LayerShape, curves: dict[str, torch.Tensor], keep: float) -> float:
    """Second-order loss cost (see :mod:`rankdown.sensitivity`) of ``shape``'s layer at kept fraction
    ``keep``, read from the loss-weighted output spectra of its linears: the MLP width as a rank of the
    down projection's outputs, the value size as one of the output projection's, the query/key size
    as ranks of the query and key outputs. Proxies (MoDeGPT selects channels, it does not truncate
    eigen-directions): what they give is the loss currency in which layers are compared."""
    sp, p = shape.spec, shape.prefix
    sizes, cost = shape.sizes(keep), 0.0
    for m in shape.mlps:
        if m.out in sizes:
            cost += _tail(curves[f"{p}.{m.out}"], sizes[m.out] / m.width)
    if "v" in sizes:
        cost += _tail(curves[f"{p}.{sp.o}"], sizes["v"] / shape.head_dim)
    if "qk" in sizes:
        f = sizes["qk"] / shape.head_dim
        cost += _tail(curves[f"{p}.{sp.q}"], f) + _tail(curves[f"{p}.{sp.k}"], f)
    return cost


def fisher_sparsity(
    shapes: list[LayerShape], curves: dict[str, torch.Tensor], total_params: int, ratio: float, cap: float
) -> tuple[list[float], int]:
    """Layer sparsities on a grid of :data:`FISHER_STEP` that minimise the summed loss cost of the
    layers under the budget: greedy on the cost per parameter removed of each layer's next step
    (over the upper hull of its (parameters removed, cost) points, so a step that only pays off with
    the next one is taken as one), then the model's size after. Raises :class:`ConfigError` when
    the ratio cannot be met to ±0.01."""
    goal = total_params * (1.0 - ratio)
    grid = [i * FISHER_STEP for i in range(int(cap / FISHER_STEP + 1e-9) + 1)]

    def points(s: LayerShape, start: float) -> list[tuple[float, int, float]]:
        pts, last = [], -1
        for phi in grid:
            if phi + 1e-12 < start:
                continue
            removed = s.dense_params - s.params(1.0 - phi)
            if removed > last:  # rounding: a step that removes nothing more is no step
                pts.append((phi, removed, layer_cost(s, curves, 1.0 - phi)))
                last = removed
        return pts

    def hull(pts: list[tuple[float, int, float]]) -> list[tuple[float, int, float]]:
        """Lower convex hull of cost against parameters removed, the first point kept."""
        out = [pts[0]]
        for q in pts[1:]:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                if (b[2] - a[2]) * (q[1] - a[1]) >= (q[2] - a[2]) * (b[1] - a[1]):
                    out.pop()
                else:
                    break
            out.append(q)
        return out

    steps = [hull(points(s, 0.0)) for s in shapes]  # per layer: (phi, params removed, cost)
    fine = [False] * len(shapes)
    at = [0] * len(shapes)
    size = total_params
    while size > goal:
        best, pick = None, -1
        for i, h in enumerate(steps):
            if at[i] + 1 < len(h):
                a, b = h[at[i]], h[at[i] + 1]
                price = (b[2] - a[2]) / max(1, b[1] - a[1])
                if best is None or price < best:
                    best, pick = price, i
        if pick < 0:
            break
        a, b = steps[pick][at[pick]], steps[pick][at[pick] + 1]
        if size - (b[1] - a[1]) < goal - 0.005 * total_params and not fine[pick]:
            # a long hull segment overshoots the budget: this layer goes on in single grid steps
            steps[pick], at[pick], fine[pick] = points(shapes[pick], a[0]), 0, True
            continue
        at[pick] += 1
        size -= b[1] - a[1]
    phis = [steps[i][at[i]][0] for i in range(len(shapes))]
    size = total_params - sum(s.dense_params - s.params(1.0 - p) for s, p in zip(shapes, phis))
    achieved = 1.0 - size / total_params
    if abs(achieved - ratio) > 0.01:
        raise ConfigError(
            f"ratio {ratio} can only be approximated to {achieved:.4f} by modegpt's fisher allocation (layer "
            f"sparsities up to the cap {cap}); use --allocation uniform, a ratio closer to {achieved:.2f}, or raise --cap"
        )
    return phis, size
