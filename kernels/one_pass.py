"""The one-pass score + top-k kernel (decode, and topk > 4).

Shapes and row packing as in :mod:`.common`: ``q`` [c, H, d], ``k`` [N, Hkv, d], ``g * c`` GQA-packed
rows per KV head. One program per (block of ``BLOCK_M`` rows of one KV head, split of the key
range, KV head). Each program walks its split in tiles of ``BLOCK_N`` keys, scores a tile with
``tl.dot`` (fp32 accumulate) and merges it into a per-row top-k list (:func:`~.merge._merge_tile`);
a tile whose rows all stay at or below their k-th best costs one row max. Each split writes an
unsorted partial list ``[c, H, splits, topk]``; :func:`~.merge._merge_splits` merges the ``splits *
topk`` candidates of each row into the sorted ``[c, H, topk]``.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED, MAX_CANDIDATES, _default_splits, _next_pow2, _sm_count, _split, tl, triton
from .merge import _merge_splits

if triton is not None:
    from .common import _load_q, _score, _split_tiles
    from .merge import _empty_lists, _merge_tile

    @triton.jit
    def _score_topk_kernel(
        # pointers
        q_ptr,
        k_ptr,
        part_v_ptr,
        part_i_ptr,
        # sizes
        n_rows,
        group,
        start,
        end,
        split_len,
        # strides (the last dim of q and k is contiguous; the partial buffers are contiguous)
        stride_qc,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_pc,
        stride_ph,
        stride_ps,
        # meta
        HEAD_DIM: tl.constexpr,
        TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        MERGE: tl.constexpr,
        SCORE_ONLY: tl.constexpr,
        END_PTR: tl.constexpr,
    ):
        """Partial top-k of one (row block, key split, KV head): writes ``part_*[i, h, split, :TOPK]``.

        With ``END_PTR`` the ``end`` argument points at the end row on the device (CUDA-graph decode:
        the range grows by one key per replay with no new launch parameters); splits past it store
        empty lists."""
        if END_PTR:
            end = tl.load(end).to(tl.int32)
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        kvh = tl.program_id(2)
        rows, row_ok, tok, head, q = _load_q(
            q_ptr, pid_m, kvh, n_rows, group, stride_qc, stride_qh, HEAD_DIM, BLOCK_M, UPCAST
        )
        best_v, best_i, thr, worst_i = _empty_lists(row_ok, TOPK, TOPK_PAD, BLOCK_M)
        slots = tl.arange(0, TOPK_PAD)

        lo, hi, n_full, offs_n, k_tile = _split_tiles(
            k_ptr, kvh, pid_s, start, end, split_len, stride_kn, stride_kh, HEAD_DIM, BLOCK_N
        )
        for t in range(0, n_full):
            s = _score(q, tl.load(k_tile), UPCAST, IEEE)  # [BLOCK_M, BLOCK_N] fp32
            if SCORE_ONLY:  # benchmark floor: scores and a row max, no top-k (results meaningless)
                best_v = tl.maximum(best_v, tl.max(s, axis=1)[:, None])
            else:
                best_v, best_i, thr, worst_i = _merge_tile(
                    s, offs_n, lo + t * BLOCK_N, best_v, best_i, thr, worst_i, MERGE
                )
            k_tile += BLOCK_N * stride_kn
        tail = lo + n_full * BLOCK_N
        if tail < hi:  # ragged last tile, masked
            col_ok = tail + offs_n < hi
            s = _score(q, tl.load(k_tile, mask=col_ok[None, :], other=0.0), UPCAST, IEEE)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            best_v, best_i, thr, worst_i = _merge_tile(s, offs_n, tail, best_v, best_i, thr, worst_i, MERGE)

        out_ok = row_ok[:, None] & (slots[None, :] < TOPK)
        p_off = tok[:, None] * stride_pc + head[:, None] * stride_ph + pid_s * stride_ps + slots[None, :]
        empty = best_i < 0
        tl.store(part_v_ptr + p_off, tl.where(empty, float("-inf"), best_v), mask=out_ok)
        tl.store(part_i_ptr + p_off, tl.where(empty, -1, best_i).to(tl.int64), mask=out_ok)


def _one_pass(q, k, start, end, topk, splits, cfg):
    """Sorted top-k by the one-pass kernel: ``[c, H, topk]`` fp32 scores and int64 indices."""
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    on_device = isinstance(end, torch.Tensor)
    n_rows, n_keys = g * c, (k.shape[0] if on_device else end) - start  # a device end: split [start, N)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    topk_pad = max(2, _next_pow2(topk))
    row_blocks = triton.cdiv(n_rows, block_m)
    if splits is None:
        splits = _default_splits(n_keys, row_blocks * Hkv, block_n, topk_pad, _sm_count(q.device))
    splits, split_len = _split(n_keys, splits, block_n)
    assert splits * topk_pad <= MAX_CANDIDATES, f"too many splits: {splits}"

    part_v = torch.empty((c, H, splits, topk), dtype=torch.float32, device=q.device)
    part_i = torch.empty((c, H, splits, topk), dtype=torch.int64, device=q.device)
    _score_topk_kernel[(row_blocks, splits, Hkv)](
        q,
        k,
        part_v,
        part_i,
        n_rows,
        g,
        start,
        end,
        split_len,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        part_v.stride(0),
        part_v.stride(1),
        part_v.stride(2),
        HEAD_DIM=d,
        TOPK=topk,
        TOPK_PAD=topk_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=INTERPRETED,
        IEEE=q.dtype == torch.float32,
        MERGE=cfg.get("MERGE", 0),
        SCORE_ONLY=cfg.get("SCORE_ONLY", False),
        END_PTR=on_device,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return _merge_splits(part_v, part_i, topk)
