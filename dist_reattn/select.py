"""The retrieval step of ReAttention (DESIGN section 2, steps 3-6).

Every rank scores its own middle tokens (local top-k), the candidates of all ranks are merged into
the exact global top-k per (query token, query head), and every rank then derives the same scope
from them: votes, recall clip, spans, and the sink and local windows.
"""

from __future__ import annotations

from dataclasses import dataclass

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


_PAD = torch.iinfo(torch.int64).max  # sorts after every real token index


@dataclass
class Scope:
    """The tokens one step attends to, in a fixed-size layout with padding.

    Attributes:
        tokens: ``[M]`` global token indices in scope order (padding entries hold 0).
        valid: ``[M]`` bool, False for padding; None when every entry is real.
        positions: ``[M]`` int64 position of each entry inside the scope (``0..|scope|-1`` over the
            real entries); None for ``0..M-1``.
    """

    tokens: torch.Tensor
    valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def selected(self) -> torch.Tensor:
        """The real tokens, ascending (waits for the device: for checks and records only)."""
        return self.tokens if self.valid is None else self.tokens[self.valid]


def vote(scores: torch.Tensor, index: torch.Tensor, recall_clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools all (query, head) winners and keeps at most ``recall_clip`` tokens by vote count.

    Ties are broken by higher best score, then lower index, so every rank and every world size
    keeps the same set. Every shape is fixed by the inputs' (no ``unique``), so nothing here waits on
    the device.

    Args:
        scores, index: ``[c, H, k]`` global top-k per (query token, query head), index -1 for padding.

    Returns:
        ``(kept, valid)``, both ``[recall_clip]``: kept global indices in rank order, and which are real.
    """
    idx, sc = index.flatten(), scores.flatten().float()
    T = idx.numel()
    idx, order = torch.where(idx >= 0, idx, _PAD).sort()
    sc = sc[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    seg = first.cumsum(0) - 1  # [T] the distinct token each pick belongs to, ascending
    uniq = torch.full_like(idx, _PAD).scatter_(0, seg, idx)  # [T] distinct tokens, then _PAD
    votes = torch.zeros_like(idx).scatter_add_(0, seg, torch.ones_like(idx))
    votes = torch.where(uniq != _PAD, votes, -1)  # padding and unused slots rank last
    best = torch.full((T,), float("-inf"), device=sc.device).scatter_reduce_(0, seg, sc, "amax")
    # Stable sorts, least significant key first: index asc (already), best desc, votes desc.
    rank = best.sort(descending=True, stable=True).indices
    rank = rank[votes[rank].sort(descending=True, stable=True).indices][:recall_clip]
    kept, valid = uniq[rank], votes[rank] > 0
    if kept.numel() < recall_clip:
        pad = recall_clip - kept.numel()
        kept = torch.cat([kept, kept.new_full((pad,), _PAD)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    return kept, valid


def widen(
    kept: torch.Tensor, valid: torch.Tensor, span: int, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widens each kept token j to ``[j - span//2, j - span//2 + span)``, clipped to ``[lo, hi)``.

    Args:
        kept, valid: ``[R]`` from :func:`vote`.

    Returns:
        ``(tokens, valid)``, both ``[R * span]``: the distinct tokens ascending, then padding.
    """
    offsets = torch.arange(span, device=kept.device) - span // 2
    tokens = kept[:, None] + offsets  # [R, span]
    ok = valid[:, None] & (tokens >= lo) & (tokens < hi)
    tokens = torch.where(ok, tokens, _PAD).flatten().sort().values
    dup = torch.zeros_like(tokens, dtype=torch.bool)
    dup[1:] = tokens[1:] == tokens[:-1]
    tokens = torch.where(dup, _PAD, tokens).sort().values
    valid = tokens != _PAD
    return torch.where(valid, tokens, 0), valid


def scope_of(n: int, cfg: ScopeConfig, selected: torch.Tensor, valid: torch.Tensor) -> Scope:
    """``[sink ; selected ; local]`` in original order, for a cache of ``n > sink + local`` tokens."""
    dev = selected.device
    tokens = torch.cat(
        [torch.arange(cfg.sink, device=dev), selected, torch.arange(n - cfg.local, n, device=dev)]
    )
    ones = torch.ones(cfg.sink, dtype=torch.bool, device=dev)
    valid = torch.cat([ones, valid, ones.new_ones(cfg.local)])
    return Scope(tokens, valid, valid.cumsum(0) - 1)


def select_from_candidates(scores: torch.Tensor, index: torch.Tensor, n: int, cfg: ScopeConfig) -> Scope:
    """Global scope from the all-gathered candidates (identical on every rank).

    Args:
        scores, index: ``[P, c, H, k]`` candidates of all ranks, global indices.
        n: tokens in the cache including the current chunk.

    Returns:
        The scope, ``sink + recall_clip * span + local`` entries whatever the data.
    """
    s, i = merge_candidates(scores, index, cfg.topk)
    kept, valid = vote(s, i, cfg.recall_clip)
    selected, valid = widen(kept, valid, cfg.span, cfg.sink, n - cfg.local)
    return scope_of(n, cfg, selected, valid)
