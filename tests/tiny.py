"""Tiny random models of every supported family, built in the test process (no network)."""

from __future__ import annotations

import torch
import transformers as tf
from transformers.pytorch_utils import Conv1D

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "llama-tied": lambda: tf.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),  # q/k/v carry biases
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=16),
    "phi3": lambda: tf.Phi3Config(**_COMMON, pad_token_id=0),
    # Phi-4-mini: model_type phi3, a quarter of each head without RoPE, tied embeddings
    "phi4": lambda: tf.Phi3Config(**_COMMON, pad_token_id=0, partial_rotary_factor=0.75, tie_word_embeddings=True),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=8),
    # a sliding layer (window 8 < the tests' 32 tokens, RoPE base 10k) and a full one (base 1M)
    "gemma3": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                          layer_types=["sliding_attention", "full_attention"]),
    "olmo2": lambda: tf.Olmo2Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": lambda: tf.SmolLM3Config(**_COMMON, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2),  # layer 1 without RoPE
    "mixtral": lambda: tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    # layer 1's MLP dense (mlp_only_layers); experts of width 32, a shared expert of 64 (qwen2_moe)
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                           num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                           num_experts_per_tok=2),
    # layer 0 dense (width 128), layer 1 MoE (experts and shared expert of width 32) without RoPE;
    # attention in chunks of 16 of the tests' 32 tokens
    "llama4": lambda: tf.Llama4TextConfig(**{**_COMMON, "intermediate_size": 32}, intermediate_size_mlp=128, head_dim=16,
                                          num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                          no_rope_layers=[1, 0], attention_chunk_size=16, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2),
    # no row: the generic path (layers, linears and shared inputs found by looking). Falcon-7B's layout: one
    # norm feeding attention and MLP in parallel, q/k/v fused; StableLM: llama-like with biased q/k/v, partial RoPE
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=128, new_decoder_architecture=False, parallel_attn=True,
                                      bias=False, bos_token_id=1, eos_token_id=2),
    "stablelm": lambda: tf.StableLmConfig(**_COMMON, use_qkv_bias=True, bos_token_id=1, eos_token_id=2),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2),  # Conv1D linears, stored (in, out)
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                                         bos_token_id=1, eos_token_id=2),  # Pythia: parallel residual, partial RoPE
    "bert": lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128),
}
FAMILIES = list(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` in eval mode (BertModel for bert)."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    cls = tf.BertModel if family == "bert" else tf.AutoModelForCausalLM
    model = cls(config) if family == "bert" else cls.from_config(config)
    if family in _OFFSET_NORMS:  # Gemma's norms start at w = 0 (a scale of 1 + w = 1): give them a shape
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    return model.eval()


_OFFSET_NORMS = {"gemma3"}  # (1 + w) norms: random w, so that a norm computing w·x would be caught


def tiny_ids(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden states of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_error(after: torch.Tensor, before: torch.Tensor) -> float:
    """Mean squared difference of two outputs relative to the mean square of ``before``."""
    return ((after - before).pow(2).mean() / before.pow(2).mean()).item()


def zeroed_error(model: "str | torch.nn.Module", ids: torch.Tensor, before: torch.Tensor) -> float:
    """:func:`rel_error` of a model (a family's tiny model, or this one, changed in place) with
    every linear of its layers set to zero: what a method that throws the layers away would score,
    the scale for a method's output error."""
    from rankdown.arch import spec_for

    model = tiny_model(model) if isinstance(model, str) else model
    _, layers = spec_for(model).find_layers(model)
    with torch.no_grad():
        for mod in layers.modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
    return rel_error(outputs(model, ids), before)
