"""The numbers of a decoder that planning needs, with no dependency on transformers."""

from __future__ import annotations

from dataclasses import dataclass

# gemma3_text: the text-only Gemma 3 (Gemma3ForCausalLM; what the GGUF loader builds). The multimodal
# "gemma3" (Gemma3ForConditionalGeneration) nests its decoder under language_model: not supported.
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    """Hugging Face ``model_type``."""
    layers: int
    heads: int
    """Query heads of the whole model."""
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    window: int
    """Trained context window (``max_position_embeddings``)."""
    tied_embeddings: bool
    sliding_layers: tuple[int, ...] = ()
    """Layers that attend over a sliding window of their own (Gemma3's local layers); they keep
    only that window, never enter the KV cache and never retrieve."""
    sliding_window: int = 0
    """Tokens a sliding layer's query sees, itself included (0 without sliding layers)."""

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The layers whose every token the KV cache keeps (all but the sliding ones), in order."""
        return tuple(i for i in range(self.layers) if i not in self.sliding_layers)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Pre-RoPE K and V of one token over the cached layers."""
        return len(self.cache_layers) * self.kv_heads * self.head_dim * 2 * dtype_bytes

    def n_params(self) -> int:
        attn = (
            self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
            + self.heads * self.head_dim * self.hidden
        )
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden
