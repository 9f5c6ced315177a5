"""Tiny random-weight Hugging Face decoders of every supported architecture, built on the spot."""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(
    arch: str, seed: int = 0, layers: int = 2, heads: int = 6, kv_heads: int = 3, vocab: int = 128
):
    """A float32 ``*ForCausalLM`` with head_dim 16 in eval mode (``gemma3_text``: :func:`tiny_gemma3`)."""
    import transformers as tf

    if arch == "gemma3_text":
        return tiny_gemma3(seed, heads=heads, vocab=vocab)

    common = dict(
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=vocab,
        max_position_embeddings=512,
        eos_token_id=vocab - 1,
        bos_token_id=0,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common), tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Random init gives near-uniform attention; sharper q/k make the retrieval step matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


GEMMA3_WINDOW = 20  # > the tests' 16-token chunks, not a multiple of them


def tiny_gemma3(seed: int = 0, heads: int = 6, vocab: int = 128, window: int = GEMMA3_WINDOW):
    """A float32 ``Gemma3ForCausalLM`` shaped like Gemma-3-270M in miniature: one KV head, head_dim
    16, sliding layers (window ``window``) around global ones, a ``query_pre_attn_scalar`` that is not
    head_dim, and two rotaries: global theta 1e4 with linear rope scaling (factor 4), local theta 10
    (small thetas so that positions matter at short lengths)."""
    import transformers as tf

    cfg = tf.Gemma3TextConfig(
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=vocab,
        max_position_embeddings=512,
        eos_token_id=vocab - 1,
        bos_token_id=0,
        pad_token_id=vocab - 2,  # not 0: generate() would mask the prompts' 0 tokens as padding
        sliding_window=window,
        layer_types=[
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        },
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    # q and k pass through RMS norms (weight w scales by 1 + w): sharpen there, not in the projections.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.add_(3.0)
            layer.self_attn.k_norm.weight.add_(3.0)
    return model
