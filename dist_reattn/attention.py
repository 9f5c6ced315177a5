"""Finite-scope attention: the model's RoPE re-applied at scope positions, then causal SDPA.

Layout in this file: heads first, ``[H, tokens, d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotation of the Llama family's RoPE: ``[-x2, x1]`` for halves ``x1, x2`` of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [..., m, d]`` by ``cos, sin`` broadcastable to it (in x's dtype, scaling included)."""
    return x * cos + rotate_half(x) * sin


# (device, dtype) -> whether a fused SDPA kernel took enable_gqa with a mask there (learned on first use)
_GQA_WITH_MASK: dict[tuple[torch.device, torch.dtype], bool] = {}


def scope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    positions: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of chunks' queries over their scopes, whose last ``c`` keys are the chunk itself.

    Keys take positions ``0..m-1`` (or ``positions``) and the queries the last ``c`` of them, so the
    causal mask is aligned bottom-right. A scope of fixed size with padding (``valid``) keeps every
    shape of a retrieval step constant: nothing waits on the host, and kernels that plan per shape
    (cuDNN attention) plan once. The leading dimension ``B`` is a batch of chunks, each with its own
    scope.

    Args:
        q: ``[B, H, c, d]`` un-rotated queries.
        k, v: ``[B, Hkv, m, d]`` un-rotated scope keys and values, ``m >= c``, ``H % Hkv == 0``.
        cos, sin: ``[>= m, d]`` rotary tables for positions ``0, 1, ...``.
        scaling: softmax scale (the model's, usually ``d ** -0.5``).
        positions: ``[B, m]`` int64 scope position of each key (padding: any value), or None for
            ``0..m-1``.
        valid: ``[B, m]`` bool, False for padding keys; with ``positions`` only.

    Returns:
        ``[B, c, H, d]`` attention output.
    """
    B, H, c, _ = q.shape
    m = k.shape[2]
    assert m >= c and H % k.shape[1] == 0 and k.shape[0] == B
    if positions is None:
        k_cos, k_sin = cos[:m], sin[:m]  # [m, d], the same for every chunk
        q_cos, q_sin = k_cos[m - c :], k_sin[m - c :]
    else:
        k_cos, k_sin = cos[positions][:, None], sin[positions][:, None]  # [B, 1, m, d]
        q_cos, q_sin = k_cos[:, :, m - c :], k_sin[:, :, m - c :]
    q = apply_rope(q, q_cos, q_sin)
    k = apply_rope(k, k_cos, k_sin)
    gqa = k.shape[1] != H
    if positions is not None:
        # query i sees the valid keys at positions up to its own
        mask = valid[:, None, :] & (positions[:, None, :] <= positions[:, m - c :, None])  # [B, c, m]
        mask = mask[:, None]  # [B, 1, c, m], the same for every head
        if q.is_cuda and gqa and _GQA_WITH_MASK.get((q.device, q.dtype), True):
            try:  # cuDNN attention takes GQA with a mask: no copy of K/V per query head
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
                _GQA_WITH_MASK[q.device, q.dtype] = True
                return out.transpose(1, 2)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # no fused kernel takes it on this GPU/build: expand the heads below
                _GQA_WITH_MASK[q.device, q.dtype] = False
    elif q.is_cuda:
        mask = causal_lower_right(c, m)  # dispatched to flash / memory-efficient attention, no [c, m] mask
    elif c > 1:
        cols = torch.arange(m, device=q.device)
        rows = torch.arange(m - c, m, device=q.device)
        mask = cols[None, :] <= rows[:, None]  # [c, m]
    else:
        mask = None
    if q.is_cuda and gqa:
        # The fused kernels take masks only without enable_gqa (cuDNN aside): expand K/V to every head.
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)  # [B, c, H, d]


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_cos: torch.Tensor,
    q_sin: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token's attention over a subset of the scope, with its log-sum-exp, in fp32.

    Decode's sequence-parallel form: each rank attends over the scope tokens it owns and the
    partial results are merged by :func:`merge_partials`; the query comes last in the scope, so every
    key is visible and no mask is needed.

    Args:
        q: ``[H, d]`` un-rotated query of one token.
        k, v: ``[Hkv, m_r, d]`` un-rotated keys and values of this rank's scope tokens (``m_r`` may be 0).
        cos, sin: ``[m_r, d]`` rotary tables at those tokens' scope positions.
        q_cos, q_sin: ``[d]`` rotary tables at the query's scope position.
        valid: ``[m_r]`` bool, False for padding keys (left out, whatever their values), or None.

    Returns:
        ``(out [H, d], lse [H])`` fp32; a rank with no tokens gives zeros and ``-inf``.
    """
    H, d = q.shape
    Hkv = k.shape[0]
    q = apply_rope(q, q_cos, q_sin).float().view(Hkv, H // Hkv, d)
    k = apply_rope(k, cos, sin).float()
    s = torch.einsum("hgd,hmd->hgm", q, k) * scaling  # [Hkv, g, m_r]
    if valid is not None:  # padding rows may hold anything, NaN included (unwritten cache rows)
        s = s.masked_fill(~valid, float("-inf"))
        v = v.masked_fill(~valid[:, None], 0.0)
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, g]
    # The weights meet V in V's dtype, as in flash attention (P is cast before P @ V): an fp32 GEMM of
    # [g, m] x [m, d] gets a slow small-N kernel from cuBLAS (130 us at m = 8K on an H200).
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    out = torch.einsum("hgm,hmd->hgd", p.to(v.dtype), v).float()
    return out.reshape(H, d), lse.reshape(H)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention from per-rank partials: ``out [P, H, d]``, ``lse [P, H]`` -> ``[H, d]``."""
    w = torch.softmax(lse, dim=0)  # [P, H]; a rank with -inf (no tokens) weighs 0
    return (w[..., None] * out).sum(0)
