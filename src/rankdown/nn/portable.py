"""Modules of compressed models, and the surgery that builds a compressed model's skeleton.

This file is self-contained on purpose (torch and transformers only, no rankdown import): io.py
copies it verbatim into every saved model folder as part of its ``modeling_rankdown.py``, so a
compressed model loads with ``trust_remote_code=True`` on a machine without rankdown. rankdown
itself imports the same classes from here, so the two can never drift apart.

A *structure* is the JSON-able description of what changed in a model, recorded in config.json
under ``rankdown.structure``::

    {"unfused_experts": ["model.layers.0.mlp.experts", ...],
     "modules": {"model.layers.0.self_attn.q_proj":
                     {"type": "lowrank", "in": 4096, "out": 4096, "rank": 1024, "bias": false}}}

Module types: ``lowrank`` (:class:`LowRankLinear`), ``linear`` (:class:`ReducedLinear`, a plain
linear of reduced size) and ``attention`` (:class:`ReducedAttention`, a whole attention module
with reduced query/key and value head sizes; MoDeGPT).
"""

from __future__ import annotations

import torch
from torch import nn

try:  # activation table of transformers; only UnfusedExperts needs it
    from transformers.activations import ACT2FN
except ImportError:  # pragma: no cover
    ACT2FN = {}


class LowRankLinear(nn.Module):
    """``y = B(A(x))``: a rank-``r`` stand-in for ``nn.Linear(in, out)``.

    ``A``: (r, in) without bias, applied first; ``B``: (out, r), with the original bias if any.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) product ``B @ A``; for code that reads ``.weight`` (dtype, device)."""
        return self.B.weight @ self.A.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def spec(self) -> dict:
        """The record :func:`build_module` rebuilds this module from."""
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.B.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class _Expert(nn.Module):
    """One gated expert MLP as three ordinary linears: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inner: int, act: str, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.Module):
    """Mixture-of-experts weights as a list of ordinary expert MLPs.

    transformers 5 stores the experts of Mixtral-like models as 3-D tensors
    (``gate_up_proj``: (E, 2·inner, hidden), ``down_proj``: (E, hidden, inner)). Unfused, every
    expert's projection is an ``nn.Linear`` that any method can compress like a dense layer. The
    forward takes the same arguments as the fused module and gives the same result.

    ``batched`` (Llama 4): the fused tensors are stored the other way round (``gate_up_proj``: (E,
    hidden, 2·inner), ``down_proj``: (E, inner, hidden)) and the forward takes every expert's copy
    of the tokens, already scaled by the router, (E·T, hidden) -> (E·T, hidden).
    """

    def __init__(self, num_experts: int, hidden: int, inner: int, act: str, device=None, dtype=None,
                 batched: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.batched = num_experts, hidden, batched
        self.experts = nn.ModuleList(
            _Expert(hidden, inner, act, device=device, dtype=dtype) for _ in range(num_experts)
        )

    @classmethod
    def from_fused(cls, fused: nn.Module, act: str) -> "UnfusedExperts":
        batched = type(fused).__name__ == "Llama4TextExperts"
        gate_up, down = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I); batched: (E, H, 2I), (E, I, H)
        if batched:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        num, inner2, hidden = gate_up.shape
        new = cls(num, hidden, inner2 // 2, act, device=gate_up.device, dtype=gate_up.dtype, batched=batched)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(new.experts):
                    gate, up = gate_up[e].chunk(2, dim=0)
                    expert.gate_proj.weight.copy_(gate)
                    expert.up_proj.weight.copy_(up)
                    expert.down_proj.weight.copy_(down[e])
        return new

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.batched:  # every expert reads its own copy of the tokens
            x = hidden_states.view(self.num_experts, -1, self.hidden)
            return torch.cat([expert(x[e]) for e, expert in enumerate(self.experts)]).view(-1, self.hidden)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class ReducedLinear(nn.Linear):
    """An ordinary ``nn.Linear`` of reduced size (an MLP of smaller width); it only adds its record."""

    def spec(self) -> dict:
        return {"type": "linear", "in": self.in_features, "out": self.out_features, "bias": self.bias is not None}


class HeadRMSNorm(nn.Module):
    """RMS norm over the last dimension (a head), as the q/k norms of Qwen3 (``w * x / rms(x)``, the
    normalised x cast back before the scale) and of Gemma 3 (``offset`` 1: ``(1 + w) * x / rms(x)``,
    the scale applied in float32 before the cast back), each family's own rounding; ``in_float``: OLMo 2's
    (``w * x / rms(x)`` over a whole projection, the scale applied in float32)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None, offset: float = 0.0, in_float: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps, self.offset, self.in_float = eps, offset, in_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset or self.in_float:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``[x2, x1]`` of ``x = [x1, x2]`` (last dimension): RoPE's half rotation, its sign folded into sin.
    One op (roll), where slicing and concatenating take three: decoding is bound by the count of ops."""
    return x.roll(x.shape[-1] // 2, -1)


class ReducedAttention(nn.Module):
    """Self-attention whose query/key head size ``qk_dim`` and value head size ``v_dim`` are reduced.

    Projections (names as in the original module): q (hidden -> heads*qk_dim), k (hidden ->
    kv_heads*qk_dim), v (hidden -> kv_heads*v_dim), o (heads*v_dim -> hidden). With RoPE, kv head
    ``g`` (and the query heads that read it) keeps the rotary pairs ``rope[g]`` (indices ``i <
    head_dim/2``; the kept dimensions are ordered ``[i..., i + head_dim/2 ...]``), so the rotary
    cos/sin that the model computes for the original ``head_dim`` are gathered at
    ``rope[g] + [0, head_dim/2]`` and rotated with the usual half-rotation. The scale stays the
    original one. Works inside the stock decoder layer: masks as the model builds them (None for
    causal, boolean or additive 4-D), a KV cache through ``past_key_values.update`` (the cache holds
    keys and values of their reduced sizes).

    Speed: the rotation runs on the projections' own (batch, tokens, heads, dim) layout, with one
    gather of cos/sin per call. Several tokens go through ``scaled_dot_product_attention`` with q, k
    and v zero-padded to one head size, the larger of the two rounded up to a multiple of 8: PyTorch's
    fused (flash) kernels need one head size for q, k and v and fall back to an unfused path 5-8x
    slower on CPU otherwise, and run faster on a multiple of 8 (zeros add nothing to the logits; the
    padded value dimensions are cut from the output). One token (decoding) takes two batched matmuls
    over each kv head's group of queries, without padding the cache.
    """

    def __init__(self, spec: dict, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden, self.heads, self.kv_heads = spec["hidden"], spec["heads"], spec["kv_heads"]
        self.head_dim, self.qk_dim, self.v_dim = spec["head_dim"], spec["qk_dim"], spec["v_dim"]
        self.scaling, self.layer_idx, self.is_causal = spec["scale"], spec["layer_idx"], spec.get("causal", True)
        self.rope = spec.get("rope")  # list (kv_heads) of kept pair indices, or None without RoPE
        self.names = dict(spec["names"])
        self.num_key_value_groups = self.heads // self.kv_heads
        bias = spec["bias"]
        kw = dict(device=device, dtype=dtype)
        shapes = {"q": (self.hidden, self.heads * self.qk_dim), "k": (self.hidden, self.kv_heads * self.qk_dim),
                  "v": (self.hidden, self.kv_heads * self.v_dim), "o": (self.heads * self.v_dim, self.hidden)}
        # "qkv" instead of q, k, v: one linear whose rows are [q; k; v] (fused as in Phi-3, GPT-2, GPT-NeoX)
        self.split = [self.heads * self.qk_dim, self.kv_heads * self.qk_dim, self.kv_heads * self.v_dim]
        shapes["qkv"] = (self.hidden, sum(self.split))
        for role, (i, o) in shapes.items():
            if role in self.names:  # no "o": the output projection lies outside (BERT's), the heads are returned
                self.add_module(self.names[role], nn.Linear(i, o, bias=bias[role], **kw))
        # RoPE on the leading rotary_dim of each original head (Phi-4-mini: part of it): the kept pairs rotate,
        # the kept dimensions after them pass through
        self.rotary_dim = spec.get("rotary_dim", self.head_dim)
        self.softcap = spec.get("softcap")  # Gemma 2: logits ← cap·tanh(logits / cap) before the mask
        eps = spec.get("qk_norm_eps")
        offset = spec.get("qk_norm_offset", 0.0)
        # OLMo 2 normalises the whole projection (every head at once), the scale applied in float32
        self.qk_norm_all = bool(spec.get("qk_norm_all", False))
        nq, nk = (self.heads * self.qk_dim, self.kv_heads * self.qk_dim) if self.qk_norm_all else (self.qk_dim,) * 2
        norm = dict(offset=offset, in_float=self.qk_norm_all, **kw)
        self.q_norm = HeadRMSNorm(nq, eps, **norm) if eps is not None else None
        self.k_norm = HeadRMSNorm(nk, eps, **norm) if eps is not None else None
        self._spec = dict(spec)
        # (device, dtype) -> (flat kept rotary dimensions (kv_heads*qk_dim,), sign (qk_dim,)); a plain dict, not
        # buffers: models are built on the meta device, where non-persistent buffers would not survive loading
        self._index: dict = {}

    def spec(self) -> dict:
        return dict(self._spec)

    def _rope_index(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._index:
            pairs = torch.tensor(self.rope, dtype=torch.long, device=device)  # (kv_heads, rotated / 2)
            idx = torch.cat([pairs, pairs + self.rotary_dim // 2], dim=-1).reshape(-1)
            half = pairs.shape[-1]
            sign = torch.cat([torch.full((half,), -1.0), torch.ones(half)]).to(device=device, dtype=dtype)
            self._index[key] = (idx, sign)
        return self._index[key]

    def _rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (b, L, head_dim) of the original size -> (b, L, kv_heads, qk_dim) at each kv head's
        kept dimensions, sin with the half rotation's sign (``rot(x)·sin = swap(x)·(sign·sin)``)."""
        idx, sign = self._rope_index(cos.device, sin.dtype)
        shape = (*cos.shape[:-1], self.kv_heads, sign.shape[0])
        return cos.index_select(-1, idx).view(shape), sin.index_select(-1, idx).view(shape) * sign

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        b, L, _ = hidden_states.shape
        Hkv, G, qk, vd = self.kv_heads, self.num_key_value_groups, self.qk_dim, self.v_dim
        proj = self._modules
        if "qkv" in self.names:
            q, k, v = proj[self.names["qkv"]](hidden_states).split(self.split, -1)
        else:
            q = proj[self.names["q"]](hidden_states)
            k = proj[self.names["k"]](hidden_states)
            v = proj[self.names["v"]](hidden_states)
        if self.q_norm is not None and self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, L, Hkv, G, qk), k.view(b, L, Hkv, qk)
        v = v.view(b, L, Hkv, vd).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if position_embeddings is None:
                raise ValueError("this attention uses rotary embeddings: the layer must pass position_embeddings")
            cos, sin = self._rope_tables(*position_embeddings)
            n = cos.shape[-1]  # rotated dimensions; fewer than qk_dim with partial RoPE
            if n == qk:
                q = q * cos[..., None, :] + _swap_halves(q) * sin[..., None, :]
                k = k * cos + _swap_halves(k) * sin
            else:
                qr, kr = q[..., :n], k[..., :n]
                q = torch.cat([qr * cos[..., None, :] + _swap_halves(qr) * sin[..., None, :], q[..., n:]], -1)
                k = torch.cat([kr * cos + _swap_halves(kr) * sin, k[..., n:]], -1)
        q = q.view(b, L, self.heads, qk).transpose(1, 2)
        k = k.transpose(1, 2)
        cache = past_key_values if cache is None else cache  # renamed ``cache`` in transformers 5.24
        cache = kwargs.get("layer_past") if cache is None else cache  # GPT-NeoX's name
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        kv_len = k.shape[2]
        mask = attention_mask
        if mask is not None:
            if mask.dim() == 4 and mask.shape[-1] > kv_len:
                mask = mask[..., :kv_len]
            if mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
        if self.softcap is not None:
            out = self._eager(q, k, v, mask)
        elif L == 1 and (mask is None or mask.dim() == 4):
            out = self._one_token(q, k, v, mask)
        else:
            out = self._sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, L, self.heads * vd)
        return (proj[self.names["o"]](out) if "o" in self.names else out), None

    def _one_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: (b, heads, 1, qk), k: (b, kv_heads, T, qk), v: (b, kv_heads, T, v), mask: None or
        (b|1, 1|heads, 1, T) -> (b, heads, 1, v). The query heads of a group share their kv head's matmul."""
        b, Hkv, G = q.shape[0], self.kv_heads, self.num_key_value_groups
        T = k.shape[2]
        s = torch.matmul(q.reshape(b, Hkv, G, self.qk_dim), k.transpose(-1, -2)) * self.scaling  # (b, Hkv, G, T)
        if mask is not None:
            m = mask.reshape(mask.shape[0], 1, 1, T) if mask.shape[1] == 1 else mask.reshape(mask.shape[0], Hkv, G, T)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)  # in float32, as SDPA and the eager attention do
        return torch.matmul(p, v).view(b, self.heads, 1, self.v_dim)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Written out, with Gemma 2's soft-capped logits (SDPA cannot cap): q: (b, heads, L, qk), k: (b,
        kv_heads, T, qk), v: (b, kv_heads, T, v), mask None (causal), boolean or additive -> (b, heads, L, v)."""
        G, L, T = self.num_key_value_groups, q.shape[2], k.shape[2]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        s = torch.tanh(s / self.softcap) * self.softcap
        if mask is None and self.is_causal:  # aligned bottom-right: a cached prefix sees everything
            mask = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(T - L)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: (b, heads, L, qk), k: (b, kv_heads, T, qk), v: (b, kv_heads, T, v) -> (b, heads, L, v)."""
        q_len, kv_len = q.shape[2], k.shape[2]
        causal = False
        if mask is None:
            causal = self.is_causal and q_len > 1
            if causal and kv_len > q_len:  # a cached prefix without a mask: causal aligned bottom-right
                mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
                causal = False
        d = -(-max(self.qk_dim, self.v_dim) // 8) * 8  # a multiple of 8: the CPU kernel's vector width
        if self.qk_dim < d:  # zeros in q and k add nothing to the logits
            q = nn.functional.pad(q, (0, d - self.qk_dim))
            k = nn.functional.pad(k, (0, d - self.qk_dim))
        if self.v_dim < d:
            v = nn.functional.pad(v, (0, d - self.v_dim))
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
            enable_gqa=self.heads != self.kv_heads,
        )
        return out[..., : self.v_dim] if self.v_dim < d else out

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, qk_dim={self.qk_dim}, "
                f"v_dim={self.v_dim}, rope={self.rope is not None}")


def _act_of(model: nn.Module) -> str:
    return getattr(model.config, "hidden_act", None) or getattr(model.config, "hidden_activation", "silu")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what a ``Conv1D`` computes (its weight transposed, its bias)."""
    w = conv.weight  # (in, out)
    new = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(w.t())
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def unfuse_experts(model: nn.Module, path: str) -> nn.Module:
    """Bring the module at ``path`` into the form methods work on, with equal weights: fused experts
    become an :class:`UnfusedExperts`, a ``Conv1D`` an ``nn.Linear`` (the structure's ``unfused_experts``
    lists both)."""
    old = model.get_submodule(path)
    new = linear_from_conv1d(old) if is_conv1d(old) else UnfusedExperts.from_fused(old, _act_of(model))
    model.set_submodule(path, new)
    return new


MODULE_TYPES = ("lowrank", "linear", "attention")  # the "type" of a structure entry


def build_module(spec: dict, like: nn.Module) -> nn.Module:
    """An empty module of the recorded ``spec``, on the device and dtype of the module it replaces."""
    p = next(like.parameters())
    kind = spec["type"]
    if kind == "lowrank":
        return LowRankLinear(
            spec["in"], spec["out"], spec["rank"], bias=spec["bias"], device=p.device, dtype=p.dtype
        )
    if kind == "linear":
        return ReducedLinear(spec["in"], spec["out"], bias=spec["bias"], device=p.device, dtype=p.dtype)
    if kind == "attention":
        return ReducedAttention(spec, device=p.device, dtype=p.dtype)
    raise ValueError(f"unknown compressed module type {kind!r}; this folder needs a newer rankdown")


def apply_structure(model: nn.Module, structure: dict | None) -> nn.Module:
    """Give ``model`` (freshly built from its base config) the shapes recorded in ``structure``."""
    if not structure:
        return model
    for path in structure.get("unfused_experts", []):
        unfuse_experts(model, path)
    for path, spec in structure.get("modules", {}).items():
        model.set_submodule(path, build_module(spec, model.get_submodule(path)))
    return model
