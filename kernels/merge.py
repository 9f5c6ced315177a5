"""Merging candidates into a sorted top-k: score descending, then key index ascending.

* :func:`sort_topk` (pure torch): the best ``topk`` of each row of candidates ``[..., m]``; the
  reference's running top-k, and the engine's merge of every rank's candidates.
* Per-row top-k lists in registers (Triton helpers): ``best_v``/``best_i`` [BLOCK_M, TOPK_PAD],
  each row's worst kept score ``thr`` and its key ``worst_i`` [BLOCK_M]; :func:`_merge_tile` merges
  a scored tile [BLOCK_M, BLOCK_N] into them (the one-pass kernel, and the two-pass kernel's second
  pass), :func:`_store_sorted` writes them out sorted.
* :func:`_merge_splits` (kernel and launcher): the one-pass kernel's per-split lists
  ``[c, H, splits, topk]`` into the sorted ``[c, H, topk]``.
"""

from __future__ import annotations

import torch

from .common import _next_pow2, tl, triton


def sort_topk(scores: torch.Tensor, index: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the ``topk`` best of each row of candidates: score descending, then index ascending.

    Args:
        scores: ``[..., m]`` fp32 candidate scores (``-inf`` for padding).
        index: ``[..., m]`` int64 candidate key indices (``-1`` for padding); no index twice in a row.
        topk: how many to keep; rows with fewer than ``topk`` candidates are padded.

    Returns:
        ``(scores, index)``, each ``[..., topk]``.
    """
    m = scores.shape[-1]
    if m < topk:
        pad = (*scores.shape[:-1], topk - m)
        scores = torch.cat([scores, scores.new_full(pad, float("-inf"))], dim=-1)
        index = torch.cat([index, index.new_full(pad, -1)], dim=-1)
    # Two stable sorts: by index ascending, then by score descending, so equal scores stay in
    # index order. Padding (-1, -inf) sorts last on score.
    index, perm = index.sort(dim=-1, stable=True)
    scores = scores.gather(-1, perm)
    scores, perm = scores.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, perm)
    return scores[..., :topk].contiguous(), index[..., :topk].contiguous()


if triton is not None:

    @triton.jit
    def _insert(best_v, best_i, thr, worst_i, m, key, need):
        """Puts ``(m, key)`` into the worst slot of each row where ``need``; returns the new lists,
        thresholds and worst-slot keys."""
        slot = (best_i == worst_i[:, None]) & need[:, None]
        best_v = tl.where(slot, m[:, None], best_v)
        best_i = tl.where(slot, key[:, None], best_i)
        thr = tl.min(best_v, axis=1)
        # Among slots tied at the worst score the highest key index is the worst.
        worst_i = tl.max(tl.where(best_v == thr[:, None], best_i, -2147483647), axis=1)
        return best_v, best_i, thr, worst_i

    @triton.jit
    def _insert_rounds(s, offs, base, m, j, best_v, best_i, thr, worst_i):
        """Rounds of extraction from the tile ``s``, starting at each row's best entry ``(m, j)``
        (``j`` the lowest column among equal maxima): each round inserts the rows' entry where it
        beats the row's threshold, masks it out and takes the next best, until no row has one."""
        need = m > thr
        while tl.max(need.to(tl.int32), axis=0) > 0:
            best_v, best_i, thr, worst_i = _insert(best_v, best_i, thr, worst_i, m, base + j, need)
            s = tl.where(offs[None, :] == j[:, None], float("-inf"), s)
            m = tl.max(s, axis=1)
            j = tl.min(tl.where(s == m[:, None], offs[None, :], 2147483647), axis=1)
            need = m > thr
        return best_v, best_i, thr, worst_i

    @triton.jit
    def _merge_tile(s, offs, base, best_v, best_i, thr, worst_i, MERGE: tl.constexpr):
        """Merges the scored tile ``s`` [BLOCK_M, BLOCK_N] (keys ``base + offs``, all above every key
        already in the lists) into the per-row lists ``best_v``/``best_i`` [BLOCK_M, TOPK_PAD].

        ``thr`` is each row's worst kept score, ``worst_i`` the key index in its slot (slots hold
        distinct indices, so the index names the slot). A later key equal to the worst loses the tie,
        so only scores strictly above ``thr`` enter. A tile where no row beats its threshold (most
        tiles after warm-up) costs one row max and one block-wide test. Otherwise, where no row has
        two entries above its threshold (the usual case past warm-up), each row's single entry is its
        max ``m``: one insertion finishes the tile. ``MERGE`` 0 finds the count and the column of
        those entries in one pass (a sum of ``2**16 + column`` over the entries above the threshold;
        BLOCK_N <= 256 keeps the fields apart); ``MERGE`` 1 in two (a count, then the lowest column
        holding ``m``). Rows with two or more go through rounds of extraction.
        """
        m = tl.max(s, axis=1)
        need = m > thr
        if tl.max(need.to(tl.int32), axis=0) > 0:
            above = s > thr[:, None]
            if MERGE == 0:
                packed = tl.sum(tl.where(above, 65536 + offs[None, :], 0), axis=1)
                over = packed >> 16
                j = packed & 65535
            else:
                over = tl.sum(above.to(tl.int32), axis=1)
                j = tl.min(tl.where(s == m[:, None], offs[None, :], 2147483647), axis=1)
            if tl.max(over, axis=0) <= 1:
                best_v, best_i, thr, worst_i = _insert(best_v, best_i, thr, worst_i, m, base + j, need)
            else:
                j = tl.min(tl.where(s == m[:, None], offs[None, :], 2147483647), axis=1)
                best_v, best_i, thr, worst_i = _insert_rounds(
                    s, offs, base, m, j, best_v, best_i, thr, worst_i
                )
        return best_v, best_i, thr, worst_i

    @triton.jit
    def _empty_lists(row_ok, TOPK, TOPK_PAD, BLOCK_M):
        """Per-row top-k lists with nothing kept: ``(best_v, best_i, thr, worst_i)``. Slots past TOPK
        (and all slots of padding rows) hold +inf so they are never the worst; empty slots hold -inf
        and distinct negative indices."""
        slots = tl.arange(0, TOPK_PAD)
        best_v = tl.where(row_ok[:, None] & (slots[None, :] < TOPK), float("-inf"), float("inf"))
        best_i = tl.zeros([BLOCK_M, TOPK_PAD], dtype=tl.int32) - 1 - slots[None, :]
        thr = tl.min(best_v, axis=1)
        worst_i = tl.max(tl.where(best_v == thr[:, None], best_i, -2147483647), axis=1)
        return best_v, best_i, thr, worst_i

    @triton.jit
    def _store_sorted(v, ix, out_v_ptr, out_i_ptr, o_off, row_ok, TOPK):
        """Writes each row's TOPK best of ``v``/``ix`` (distinct indices; padding -inf/-1) sorted:
        score descending, index ascending; once only padding is left, (-inf, -1)."""
        for r in tl.static_range(TOPK):
            m = tl.max(v, axis=1)
            j = tl.min(tl.where(v == m[:, None], ix, 9223372036854775807), axis=1)
            tl.store(out_v_ptr + o_off + r, m, mask=row_ok)
            tl.store(out_i_ptr + o_off + r, j, mask=row_ok)
            v = tl.where(ix == j[:, None], float("-inf"), v)

    @triton.jit
    def _merge_splits_kernel(
        # pointers
        part_v_ptr,
        part_i_ptr,
        out_v_ptr,
        out_i_ptr,
        # sizes
        n_rows,
        n_cand,
        # meta
        TOPK: tl.constexpr,
        CAND_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Sorted top-``TOPK`` of each row's ``n_cand`` candidates (rows contiguous, row-major)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        cand = tl.arange(0, CAND_PAD)
        ok = row_ok[:, None] & (cand[None, :] < n_cand)
        off = rows.to(tl.int64)[:, None] * n_cand + cand[None, :]
        v = tl.load(part_v_ptr + off, mask=ok, other=float("-inf"))  # [BLOCK_R, CAND_PAD]
        ix = tl.load(part_i_ptr + off, mask=ok, other=-1)
        # Candidate indices are distinct (padding is -1 at -inf).
        _store_sorted(v, ix, out_v_ptr, out_i_ptr, rows.to(tl.int64) * TOPK, row_ok, TOPK)


def _merge_splits(part_v: torch.Tensor, part_i: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted top-``topk`` of each row's ``splits * topk`` candidates.

    Args:
        part_v: ``[c, H, splits, topk]`` fp32 scores, contiguous (``-inf`` for padding).
        part_i: ``[c, H, splits, topk]`` int64 key indices, contiguous (``-1`` for padding), distinct
            per (token, head).
        topk: keys kept.

    Returns:
        ``(scores, index)``, each ``[c, H, topk]``.
    """
    c, H, splits = part_v.shape[:3]
    out_v = torch.empty((c, H, topk), dtype=torch.float32, device=part_v.device)
    out_i = torch.empty((c, H, topk), dtype=torch.int64, device=part_v.device)
    n_cand = splits * topk
    cand_pad = _next_pow2(n_cand)
    block_r = max(1, min(128, 4096 // cand_pad))
    _merge_splits_kernel[(triton.cdiv(c * H, block_r),)](
        part_v,
        part_i,
        out_v,
        out_i,
        c * H,
        n_cand,
        TOPK=topk,
        CAND_PAD=cand_pad,
        BLOCK_R=block_r,
        num_warps=4,
    )
    return out_v, out_i
