"""The numbers of a decoder that planning needs, with no dependency on transformers."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


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

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Pre-RoPE K and V of one token over all layers."""
        return self.layers * self.kv_heads * self.head_dim * 2 * dtype_bytes

    def n_params(self) -> int:
        attn = (
            self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
            + self.heads * self.head_dim * self.hidden
        )
        mlp = 3 * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden
