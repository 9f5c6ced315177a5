"""Finite-scope attention: the model's RoPE re-applied at scope positions, then causal SDPA.

Layout in this file: heads first, ``[H, tokens, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotation of the Llama family's RoPE: ``[-x2, x1]`` for halves ``x1, x2`` of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [H, m, d]`` by ``cos, sin [m, d]`` (already in x's dtype, scaling included)."""
    return x * cos + rotate_half(x) * sin


def scope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Causal attention of a chunk's queries over a scope whose last ``c`` keys are the chunk itself.

    Keys take positions ``0..m-1`` and the queries the last ``c`` of them, so the causal mask is
    aligned bottom-right.

    Args:
        q: ``[H, c, d]`` un-rotated queries.
        k, v: ``[Hkv, m, d]`` un-rotated scope keys and values, ``m >= c``, ``H % Hkv == 0``.
        cos, sin: ``[m, d]`` rotary tables for positions ``0..m-1``.
        scaling: softmax scale (the model's, usually ``d ** -0.5``).

    Returns:
        ``[c, H, d]`` attention output.
    """
    H, c, _ = q.shape
    m = k.shape[1]
    assert m >= c and H % k.shape[0] == 0
    q = apply_rope(q, cos[m - c :], sin[m - c :])
    k = apply_rope(k, cos, sin)
    mask = None
    if c > 1:
        # query i (position m - c + i) sees keys 0 .. m - c + i
        cols = torch.arange(m, device=q.device)
        rows = torch.arange(m - c, m, device=q.device)
        mask = cols[None, :] <= rows[:, None]  # [c, m]
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, scale=scaling, enable_gqa=k.shape[0] != H
    )  # [1, H, c, d]
    return out[0].transpose(0, 1)
