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
    """

    def __init__(self, num_experts: int, hidden: int, inner: int, act: str, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(
            _Expert(hidden, inner, act, device=device, dtype=dtype) for _ in range(num_experts)
        )

    @classmethod
    def from_fused(cls, fused: nn.Module, act: str) -> "UnfusedExperts":
        gate_up, down = fused.gate_up_proj, fused.down_proj  # (E, 2I, H), (E, H, I)
        num, inner2, hidden = gate_up.shape
        new = cls(num, hidden, inner2 // 2, act, device=gate_up.device, dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(new.experts):
                    gate, up = gate_up[e].chunk(2, dim=0)
                    expert.gate_proj.weight.copy_(gate)
                    expert.up_proj.weight.copy_(up)
                    expert.down_proj.weight.copy_(down[e])
        return new

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _act_of(model: nn.Module) -> str:
    return getattr(model.config, "hidden_act", None) or getattr(model.config, "hidden_activation", "silu")


def unfuse_experts(model: nn.Module, path: str) -> UnfusedExperts:
    """Replace the fused experts module at ``path`` by an :class:`UnfusedExperts` with equal weights."""
    new = UnfusedExperts.from_fused(model.get_submodule(path), _act_of(model))
    model.set_submodule(path, new)
    return new


def build_module(spec: dict, like: nn.Module) -> nn.Module:
    """An empty module of the recorded ``spec``, on the device and dtype of the module it replaces."""
    p = next(like.parameters())
    kind = spec["type"]
    if kind == "lowrank":
        return LowRankLinear(
            spec["in"], spec["out"], spec["rank"], bias=spec["bias"], device=p.device, dtype=p.dtype
        )
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
