"""What a decoder (or encoder) layer is made of, per model family, as data.

Every method speaks this vocabulary instead of a family's attribute names: the list of layers,
the attention's q/k/v/o projections, the MLP's input and output projections, whether positions
are rotary, and whether experts must be unfused first. Adding a family is one entry in
``FAMILIES``; the contract tests then run every method on a tiny model of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rankdown.nn.portable import is_conv1d, unfuse_experts


class UnsupportedModelError(ValueError):
    """The model's family has no entry in rankdown's architecture table."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one model family live. Paths inside a layer are relative to the layer."""

    family: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths of the ModuleList of layers, tried in order
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # (gate, up) for a gated MLP, (up,) otherwise
    mlp_out: str
    rope: bool = True
    gated_mlp: bool = True
    causal: bool = True
    experts: str | None = None  # fused experts module inside a layer (unfused before compressing)
    # with experts: mlp_in/mlp_out name a shared expert beside them (Qwen2-MoE), or are empty (Mixtral);
    # dense_mlp names (gate, up, down) of the layers whose MLP is dense (Qwen-MoE's mlp_only_layers)
    dense_mlp: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())  # linears never compressed (routers)
    attention: str | None = None  # the attention module inside a layer (replaced whole by structured methods)
    qk_norm: bool = False  # queries and keys are RMS-normalised over the head dimension (Qwen3)
    qk_norm_all: bool = False  # ... over the whole projection, every head at once (OLMo 2)
    qkv_per_head: bool = False  # a fused qkv linear's rows are [q; k; v] per head (GPT-NeoX), not [q; k; v]
    norm_offset: float = 0.0  # the RMS norms scale by ``(norm_offset + w)``: Gemma's ``(1 + w)``
    no_structured: str = ""  # why MoDeGPT's reduced attention cannot rebuild this family's (empty: it can)
    conv1d: bool = False  # the linears are GPT-2's Conv1D, weights stored (in, out): made nn.Linear first
    observed: tuple[tuple[str, ...], ...] = ()  # the generic path: groups found with hooks (arch/generic.py)

    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    def find_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The dotted path and the ModuleList of the model's decoder (encoder) layers."""
        for path in self.layers:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList):
                return path, mod
        raise UnsupportedModelError(
            f"{self.family}: none of the layer lists {list(self.layers)} exists in "
            f"{type(model).__name__}; load the model with AutoModelForCausalLM (or AutoModel for encoders)"
        )

    def groups(self, layer: nn.Module) -> list[list[str]]:
        """Linears of one layer in compression order; the linears of a group share an input.

        ``[q,k,v] -> [o] -> [mlp inputs] -> [mlp output]`` (docs/METHODS.md §0). With unfused experts
        the MLP groups hold every expert's projections.
        """
        if self.observed:  # the names of layer 0; a layer without one of them skips it
            present = {n for n, _ in layer.named_modules()}
            return [g for g in ([n for n in group if n in present] for group in self.observed) if g]
        attn_in = list(dict.fromkeys([self.q, self.k, self.v]))
        if self.experts is not None and not self.has_experts(layer):
            mlp_in, mlp_out = list(self.dense_mlp[:-1]), list(self.dense_mlp[-1:])
        elif self.experts is not None:
            experts = layer.get_submodule(self.experts)
            n = len(experts.experts)
            mlp_in = [f"{self.experts}.experts.{e}.{p}" for e in range(n) for p in ("gate_proj", "up_proj")]
            mlp_out = [f"{self.experts}.experts.{e}.down_proj" for e in range(n)]
            mlp_in += list(self.mlp_in)  # a shared expert reads the same input
            mlp_out += [self.mlp_out] if self.mlp_out else []
        else:
            mlp_in, mlp_out = list(self.mlp_in), [self.mlp_out]
        return [attn_in, [self.o], mlp_in, mlp_out]

    def mlps(self, layer: nn.Module) -> list[tuple[tuple[str, ...], str]]:
        """The MLPs of one layer as (input projections, output projection): the dense MLP; or every
        unfused expert and the shared expert beside them; or an MoE model's dense MLP in a layer without
        experts."""
        if self.observed:
            return []
        if self.experts is not None and not self.has_experts(layer):
            return [(tuple(self.dense_mlp[:-1]), self.dense_mlp[-1])] if self.dense_mlp else []
        out = []
        if self.experts is not None:
            n = len(layer.get_submodule(self.experts).experts)
            out = [((f"{e}.gate_proj", f"{e}.up_proj"), f"{e}.down_proj")
                   for e in (f"{self.experts}.experts.{i}" for i in range(n))]
        if self.mlp_out:
            out.append((tuple(self.mlp_in), self.mlp_out))
        return out

    def has_experts(self, layer: nn.Module) -> bool:
        """Whether this layer's MLP is a mixture of experts (not a dense one of an MoE model)."""
        if self.experts is None:
            return False
        try:
            layer.get_submodule(self.experts)
        except AttributeError:
            return False
        return True

    @property
    def streamable(self) -> bool:
        """Whether a checkpoint's tensors map one to one onto the prepared model's (layer streaming)."""
        return self.experts is None and not self.conv1d

    def prepare(self, model: nn.Module) -> list[str]:
        """Bring the model into the form methods work on; returns the paths changed (unfused experts,
        Conv1D made nn.Linear), which the saved structure records so that loading does the same."""
        if self.conv1d:
            return self._linears_from_conv1d(model)
        if self.experts is None:
            return []
        path, layers = self.find_layers(model)
        done = []
        for i, layer in enumerate(layers):
            if not self.has_experts(layer):
                continue
            mod = layer.get_submodule(self.experts)
            if hasattr(mod, "gate_up_proj"):  # still fused
                full = f"{path}.{i}.{self.experts}"
                unfuse_experts(model, full)
                done.append(full)
        return done


    def _linears_from_conv1d(self, model: nn.Module) -> list[str]:
        path, layers = self.find_layers(model)
        done = []
        for i, layer in enumerate(layers):
            for name in dict.fromkeys(n for g in self.groups(layer) for n in g):
                mod = layer.get_submodule(name)
                if not is_conv1d(mod):
                    continue
                if mod.weight.device.type == "meta":  # a streamed skeleton: the files hold (in, out)
                    raise UnsupportedModelError(
                        f"{self.family} stores its linears transposed (Conv1D): streaming cannot map them; "
                        "compress it in memory (--no-stream)")
                full = f"{path}.{i}.{name}"
                unfuse_experts(model, full)
                done.append(full)
        return done


_LLAMA_LIKE = dict(
    layers=("model.layers",),
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", attention="self_attn",
)

FAMILIES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), **_LLAMA_LIKE),
    ArchSpec("mistral", ("mistral",), **_LLAMA_LIKE),
    ArchSpec("qwen2", ("qwen2",), **_LLAMA_LIKE),
    ArchSpec("qwen3", ("qwen3",), **_LLAMA_LIKE, qk_norm=True),
    # post-norms only; q/k RMS norms over the whole projection (all heads at once): query/key kept whole
    ArchSpec("olmo2", ("olmo2",), **_LLAMA_LIKE, qk_norm=True, qk_norm_all=True),
    # llama-like, every 4th layer without RoPE (no_rope_layers): its attention's use_rope says which
    ArchSpec("smollm3", ("smollm3",), **_LLAMA_LIKE),
    # attention logits soft-capped (the reduced attention's eager path); sliding layers: the model's masks
    ArchSpec("gemma2", ("gemma2",), **_LLAMA_LIKE, norm_offset=1.0),
    # sliding and full layers with their own RoPE bases: the model hands each layer its cos/sin and mask
    ArchSpec("gemma3", ("gemma3_text",), **_LLAMA_LIKE, qk_norm=True, norm_offset=1.0),
    ArchSpec(
        "phi3", ("phi3",), layers=("model.layers",),
        q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj", o="self_attn.o_proj",
        mlp_in=("mlp.gate_up_proj",), mlp_out="mlp.down_proj", attention="self_attn",  # fused: sliced by role
    ),
    ArchSpec(
        "mixtral", ("mixtral",), layers=("model.layers",),
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        mlp_in=(), mlp_out="", experts="mlp.experts", exclude=("mlp.gate",), attention="self_attn",
    ),
    ArchSpec(  # routed experts plus a gated shared expert; the routers (gate, shared_expert_gate) stay dense
        "qwen2_moe", ("qwen2_moe",), layers=("model.layers",),
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        mlp_in=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), mlp_out="mlp.shared_expert.down_proj",
        experts="mlp.experts", exclude=("mlp.gate", "mlp.shared_expert_gate"),
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), attention="self_attn",
    ),
    ArchSpec(  # routed experts only, Qwen3's per-head q/k norms
        "qwen3_moe", ("qwen3_moe",), layers=("model.layers",),
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        mlp_in=(), mlp_out="", experts="mlp.experts", exclude=("mlp.gate",), qk_norm=True,
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), attention="self_attn",
    ),
    ArchSpec(  # Llama 4 text: MoE layers (routed experts, every token through each, plus a shared expert)
        # interleaved with dense ones; chunked attention, NoPE layers, L2 q/k norms without weights
        "llama4", ("llama4_text",), layers=("model.layers",),
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        mlp_in=("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"),
        mlp_out="feed_forward.shared_expert.down_proj", experts="feed_forward.experts",
        exclude=("feed_forward.router",),
        dense_mlp=("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
        no_structured=("its attention (chunked windows, weightless L2 query/key norms, a position-dependent query "
                       "temperature in its NoPE layers) is not one the reduced attention computes"),
    ),
    ArchSpec(
        "opt", ("opt",), layers=("model.decoder.layers",),
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
        mlp_in=("fc1",), mlp_out="fc2", rope=False, gated_mlp=False, attention="self_attn",
    ),
    ArchSpec(  # Conv1D linears, q/k/v fused in c_attn, learned positions
        "gpt2", ("gpt2",), layers=("transformer.h",),
        q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj",
        mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", rope=False, gated_mlp=False, attention="attn", conv1d=True,
    ),
    ArchSpec(  # Pythia: q/k/v fused (interleaved per head), partial RoPE, parallel attention and MLP
        "gpt_neox", ("gpt_neox",), layers=("gpt_neox.layers",),
        q="attention.query_key_value", k="attention.query_key_value", v="attention.query_key_value",
        o="attention.dense", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h", gated_mlp=False,
        attention="attention", qkv_per_head=True,
    ),
    ArchSpec(
        "bert", ("bert", "roberta", "xlm-roberta"),
        layers=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        q="attention.self.query", k="attention.self.key", v="attention.self.value",
        o="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense",
        rope=False, gated_mlp=False, causal=False, attention="attention.self",  # o lies outside: attention.output
    ),
)

def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMS norm module, whichever attribute its family keeps it in."""
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UnsupportedModelError(f"{type(norm).__name__} keeps its epsilon in no attribute rankdown knows")


_BY_TYPE = {t: spec for spec in FAMILIES for t in spec.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def base_model_type(config) -> str:
    """The family's model_type, also for a rankdown-saved model (``rankdown_llama`` -> ``llama``)."""
    record = getattr(config, "rankdown", None) or {}
    return record.get("base_model_type") or config.model_type


def structured_model_types() -> list[str]:
    """The model types whose attention MoDeGPT can rebuild (a row naming its attention, no refusal)."""
    return sorted(t for s in FAMILIES if s.attention and not s.no_structured for t in s.model_types)


def spec_for(model_or_config) -> ArchSpec:
    """The :class:`ArchSpec` of a model or config. A model of a family without a row gets one found by
    looking at it (the generic path, :mod:`rankdown.arch.generic`, said with a warning); a config of one,
    or a model without a repeated block of linears, a clear error."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = base_model_type(config)
    if mt in _BY_TYPE:
        return _BY_TYPE[mt]
    if isinstance(model_or_config, nn.Module):
        from rankdown.arch.generic import generic_spec

        spec = generic_spec(model_or_config, mt, structured_model_types())
        if spec is not None:
            return spec
    raise UnsupportedModelError(
        f"model_type {mt!r} is not supported by rankdown: it has no row in its table"
        f"{' and no repeated block list of linear layers' if isinstance(model_or_config, nn.Module) else ''}. "
        f"Supported: {', '.join(supported_model_types())}. A new family is one ArchSpec entry in "
        "rankdown/arch/__init__.py."
    )
