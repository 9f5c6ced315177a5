"""Tiny random-weight Hugging Face decoders of every supported architecture, built on the spot."""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(
    arch: str, seed: int = 0, layers: int = 2, heads: int = 6, kv_heads: int = 3, vocab: int = 128
):
    """A float32 ``*ForCausalLM`` with head_dim 16 in eval mode."""
    import transformers as tf

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
