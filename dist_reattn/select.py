"""The retrieval step of ReAttention (DESIGN section 2, steps 3-6).

Every rank scores its own middle tokens (local top-k), the candidates of all ranks are merged into
the exact global top-k per (query token, query head), and every rank then derives the same scope
from them: votes, recall clip, spans, and the sink and local windows.
"""

from __future__ import annotations

import torch

from .config import ScopeConfig
from .kernels import score_topk, score_topk_ref, sort_topk, supports


def local_topk(
    q: torch.Tensor, keys: torch.Tensor, lo: int, hi: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q . k`` over local key rows ``[lo, hi)``.

    Uses the Triton kernel where it runs (CUDA tensors) and the blocked pure-torch reference elsewhere.

    Args:
        q: ``[c, H, d]`` un-rotated queries of all heads.
        keys: ``[N_local, Hkv, d]`` this rank's un-rotated keys of one layer.

    Returns:
        ``(scores, rows)``: ``[c, H, topk]`` fp32 scores and int64 local rows (-1 for padding).
    """
    fn = score_topk if q.is_cuda and supports(q.device) else score_topk_ref
    return fn(q, keys, lo, hi, topk)


def merge_candidates(
    scores: torch.Tensor, index: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from every rank's local top-k: exact, since each global winner is in its owner's list.

    Args:
        scores, index: ``[P, c, H, k]`` candidates of all ranks, global indices (-1 for padding).

    Returns:
        ``[c, H, topk]`` scores and global indices, ordered by score then lower index.
    """
    P, c, H, k = scores.shape
    s = scores.permute(1, 2, 0, 3).reshape(c, H, P * k)
    i = index.permute(1, 2, 0, 3).reshape(c, H, P * k)
    return sort_topk(s, i, topk)


def vote(scores: torch.Tensor, index: torch.Tensor, recall_clip: int) -> torch.Tensor:
    """Pools all (query, head) winners and keeps at most ``recall_clip`` tokens by vote count.

    Ties are broken by higher best score, then lower index, so every rank and every world size
    keeps the same set.

    Args:
        scores, index: ``[c, H, k]`` global top-k per (query token, query head).

    Returns:
        Kept global token indices, ascending, ``[<= recall_clip]``.
    """
    idx, sc = index.flatten(), scores.flatten()
    valid = idx >= 0
    idx, sc = idx[valid], sc[valid]
    uniq, inv, votes = torch.unique(idx, return_inverse=True, return_counts=True)  # uniq ascending
    if uniq.numel() <= recall_clip:
        return uniq
    best = torch.full(uniq.shape, float("-inf"), device=sc.device).scatter_reduce(0, inv, sc, "amax")
    # Stable sorts, least significant key first: index asc (already), best desc, votes desc.
    order = best.sort(descending=True, stable=True).indices
    order = order[votes[order].sort(descending=True, stable=True).indices]
    return uniq[order[:recall_clip]].sort().values


def widen(kept: torch.Tensor, span: int, lo: int, hi: int) -> torch.Tensor:
    """Widens each kept token j to ``[j - span//2, j - span//2 + span)``, clipped to ``[lo, hi)``.

    Returns:
        Sorted, de-duplicated global indices.
    """
    offsets = torch.arange(span, device=kept.device) - span // 2
    tokens = (kept[:, None] + offsets).flatten()
    tokens = tokens[(tokens >= lo) & (tokens < hi)]
    return torch.unique(tokens)


def scope_indices(n: int, cfg: ScopeConfig, selected: torch.Tensor) -> torch.Tensor:
    """``[sink ; selected ; local]`` in original order, for a cache of ``n`` tokens with ``n > sink + local``."""
    dev = selected.device
    return torch.cat(
        [
            torch.arange(cfg.sink, device=dev),
            selected,
            torch.arange(n - cfg.local, n, device=dev),
        ]
    )


def select_from_candidates(
    scores: torch.Tensor, index: torch.Tensor, n: int, cfg: ScopeConfig
) -> torch.Tensor:
    """Global scope from the all-gathered candidates (identical on every rank).

    Args:
        scores, index: ``[P, c, H, k]`` candidates of all ranks, global indices.
        n: tokens in the cache including the current chunk.

    Returns:
        Scope token indices (global, ascending) ``[m]``.
    """
    s, i = merge_candidates(scores, index, cfg.topk)
    kept = vote(s, i, cfg.recall_clip)
    selected = widen(kept, cfg.span, cfg.sink, n - cfg.local)
    return scope_indices(n, cfg, selected)
