"""The two-pass score + top-k kernels (prefill at topk <= 4).

Shapes and row packing as in :mod:`.common`: ``q`` [c, H, d], ``k`` [N, Hkv, d], ``g * c`` GQA-packed
rows per KV head, padded to ``rows_pad`` (whole blocks of ``BLOCK_M``). Tile ``t`` holds keys
``start + t * BLOCK_N`` onward.

* Pass 1 (:func:`_tile_max_kernel`), programs as the one-pass kernel's: per row and split, the four
  largest tile maxima and their tiles, ``[Hkv, rows_pad, splits * 4]`` (no merge in the scan).
* Between (:func:`_plan_kernel`), per block of ``BLOCK_M2`` rows: each row's k best tiles
  (``picks`` [Hkv, rows_pad, TOPK_PAD]), its bound ``tau`` [Hkv, rows_pad], and the block's tiles
  to revisit, ascending (``ids`` [Hkv, n_blocks, BLOCK_M2 * TOPK_PAD], ``count`` [Hkv, n_blocks]).
* Pass 2 (:func:`_revisit_kernel`), per block of ``BLOCK_M2`` rows: the exact merge of the one-pass
  kernel (:func:`~.merge._merge_tile`) over only the listed tiles, sorted ``[c, H, topk]``.

See :func:`_two_pass` for why no winner can be missed, whatever the rounding of either pass.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED, _default_splits, _next_pow2, _sm_count, _split, tl, triton

# Tile number that names no tile (sorts after every real one).
NO_TILE = 2**31 - 1

if triton is not None:
    from .common import _load_q, _score, _split_tiles
    from .merge import _empty_lists, _merge_tile, _store_sorted

    @triton.jit
    def _keep4(m, t, a0, a1, a2, a3, t0, t1, t2, t3):
        """Puts each row's tile max ``m`` (of tile ``t``, later than every tile kept) into the row's
        four best tile maxima ``a0 >= a1 >= a2 >= a3`` (tiles ``t0..t3``); an equal maximum keeps the
        earlier tile ahead. Elementwise on the rows: no reduction, no layout change."""
        c0 = m > a0
        c1 = m > a1
        c2 = m > a2
        c3 = m > a3
        a3 = tl.where(c2, a2, tl.where(c3, m, a3))
        t3 = tl.where(c2, t2, tl.where(c3, t, t3))
        a2 = tl.where(c1, a1, tl.where(c2, m, a2))
        t2 = tl.where(c1, t1, tl.where(c2, t, t2))
        a1 = tl.where(c0, a0, tl.where(c1, m, a1))
        t1 = tl.where(c0, t0, tl.where(c1, t, t1))
        a0 = tl.where(c0, m, a0)
        t0 = tl.where(c0, t, t0)
        return a0, a1, a2, a3, t0, t1, t2, t3

    @triton.jit
    def _tile_max_kernel(
        # pointers
        q_ptr,
        k_ptr,
        cand_a_ptr,
        cand_t_ptr,
        # sizes
        n_rows,
        group,
        start,
        end,
        split_len,
        # strides (the candidate buffers are contiguous [Hkv, rows, splits * 4])
        stride_qc,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_ch,
        stride_cr,
        # meta
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """First pass of the two-pass top-k: per row, the four largest tile maxima of one split and
        their tiles (tile ``t`` = keys ``start + t * BLOCK_N`` onward). Per tile: one dot, one row max
        and an elementwise insertion; no block-wide test, so large tiles cost no extra merges."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        kvh = tl.program_id(2)
        rows, row_ok, tok, head, q = _load_q(
            q_ptr, pid_m, kvh, n_rows, group, stride_qc, stride_qh, HEAD_DIM, BLOCK_M, UPCAST
        )

        a0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        t0 = tl.full([BLOCK_M], 2147483647, tl.int32)  # NO_TILE
        t1 = t0
        t2 = t0
        t3 = t0

        lo, hi, n_full, offs_n, k_tile = _split_tiles(
            k_ptr, kvh, pid_s, start, end, split_len, stride_kn, stride_kh, HEAD_DIM, BLOCK_N
        )
        tile0 = pid_s * (split_len // BLOCK_N)
        for t in range(0, n_full):
            s = _score(q, tl.load(k_tile), UPCAST, IEEE)
            a0, a1, a2, a3, t0, t1, t2, t3 = _keep4(
                tl.max(s, axis=1), tile0 + t, a0, a1, a2, a3, t0, t1, t2, t3
            )
            k_tile += BLOCK_N * stride_kn
        tail = lo + n_full * BLOCK_N
        if tail < hi:
            col_ok = tail + offs_n < hi
            s = _score(q, tl.load(k_tile, mask=col_ok[None, :], other=0.0), UPCAST, IEEE)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            a0, a1, a2, a3, t0, t1, t2, t3 = _keep4(
                tl.max(s, axis=1), tile0 + n_full, a0, a1, a2, a3, t0, t1, t2, t3
            )

        # Every row of the grid is written; rows past n_rows name no tile.
        off = kvh * stride_ch + rows.to(tl.int64) * stride_cr + pid_s * 4
        tl.store(cand_a_ptr + off, a0)
        tl.store(cand_a_ptr + off + 1, a1)
        tl.store(cand_a_ptr + off + 2, a2)
        tl.store(cand_a_ptr + off + 3, a3)
        tl.store(cand_t_ptr + off, tl.where(row_ok, t0, 2147483647))
        tl.store(cand_t_ptr + off + 1, tl.where(row_ok, t1, 2147483647))
        tl.store(cand_t_ptr + off + 2, tl.where(row_ok, t2, 2147483647))
        tl.store(cand_t_ptr + off + 3, tl.where(row_ok, t3, 2147483647))

    @triton.jit
    def _plan_kernel(
        # pointers (all buffers contiguous)
        cand_a_ptr,
        cand_t_ptr,
        tau_ptr,
        picks_ptr,
        ids_ptr,
        count_ptr,
        # sizes
        n_cand,
        rows_pad,
        n_blocks,
        # meta
        TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        CAND_PAD: tl.constexpr,
    ):
        """Between the passes, per block of ``BLOCK_M`` rows of one KV head: each row's TOPK best
        listed tiles (tile max descending, then tile ascending) into ``picks`` [Hkv, rows_pad,
        TOPK_PAD] (NO_TILE past TOPK and where a row has fewer tiles), its bound ``tau`` (the
        TOPK-th of those maxima), and the block's tiles to revisit, once each, ascending, then
        NO_TILE."""
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        local = tl.arange(0, BLOCK_M)
        rows = pid * BLOCK_M + local  # the grid covers rows_pad exactly
        cols = tl.arange(0, CAND_PAD)
        ok = (cols < n_cand)[None, :]
        off = (kvh * rows_pad + rows).to(tl.int64)[:, None] * n_cand + cols[None, :]
        a = tl.load(cand_a_ptr + off, mask=ok, other=float("-inf"))
        t = tl.load(cand_t_ptr + off, mask=ok, other=2147483647)
        slots = tl.arange(0, TOPK_PAD)
        pick = tl.full([BLOCK_M, TOPK_PAD], 2147483647, tl.int32)
        for r in tl.static_range(TOPK):  # a row's tiles are distinct, so the tile names the entry
            tau = tl.max(a, axis=1)
            j = tl.min(tl.where(a == tau[:, None], t, 2147483647), axis=1)
            pick = tl.where(slots[None, :] == r, j[:, None], pick)
            a = tl.where(t == j[:, None], float("-inf"), a)
            t = tl.where(t == j[:, None], 2147483647, t)  # once only NO_TILE is left, pick that
        tl.store(tau_ptr + kvh * rows_pad + rows, tau)
        row_off = (kvh * rows_pad + rows).to(tl.int64)[:, None] * TOPK_PAD
        tl.store(picks_ptr + row_off + slots[None, :], pick)
        # The block's picks go through its slice of ``ids`` to come back as one flat vector.
        block_ids = ids_ptr + (kvh * n_blocks + pid).to(tl.int64) * (BLOCK_M * TOPK_PAD)
        tl.store(block_ids + local[:, None] * TOPK_PAD + slots[None, :], pick)
        tl.debug_barrier()
        n = tl.arange(0, BLOCK_M * TOPK_PAD)
        ids = tl.load(block_ids + n)
        tl.debug_barrier()
        # A tile listed earlier in the block is a repeat: dropped (NO_TILE). Each remaining tile goes
        # to its rank among them, so the list is ascending.
        seen = (ids[:, None] == ids[None, :]) & (n[None, :] < n[:, None])
        ids = tl.where(tl.max(seen.to(tl.int32), axis=1) > 0, 2147483647, ids)
        rank = tl.sum((ids[None, :] < ids[:, None]).to(tl.int32), axis=1)
        real = ids != 2147483647
        tl.store(block_ids + rank, ids, mask=real)
        tl.store(count_ptr + kvh * n_blocks + pid, tl.sum(real.to(tl.int32), axis=0))

    @triton.jit
    def _revisit_kernel(
        # pointers
        q_ptr,
        k_ptr,
        tau_ptr,
        picks_ptr,
        ids_ptr,
        count_ptr,
        out_v_ptr,
        out_i_ptr,
        # sizes
        n_rows,
        group,
        start,
        end,
        n_ids,
        n_blocks,
        rows_pad,
        # strides
        stride_qc,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_oc,
        stride_oh,
        # meta
        HEAD_DIM: tl.constexpr,
        TOPK: tl.constexpr,
        TOPK_PAD: tl.constexpr,
        PICK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        MERGE: tl.constexpr,
        FILTER: tl.constexpr,
    ):
        """Second pass: exact, sorted top-k of one block of rows over the ``count`` distinct tiles,
        ascending, that :func:`_plan_kernel` listed for it. ``FILTER`` 1: a row takes every key of
        its own picked tiles, and from the block's other tiles only scores at or above its bound
        ``tau`` (pass 1's k-th tile max, an optimisation: the proof in :func:`_two_pass` needs only
        the own tiles). ``FILTER`` 0: every key of every listed tile. ``FILTER`` 2 (benchmark
        baseline only, not exact): session 4's ``s >= tau`` alone. ``FILTER`` 3 (the FP8 path,
        :mod:`.fp8`): every key of the row's own picked tiles and nothing else, so a row's result
        does not depend on which rows share its block. A row's picks are ``picks`` [Hkv, rows_pad,
        PICK_PAD] (``PICK_PAD`` is ``TOPK_PAD`` on the exact path)."""
        pid_m = tl.program_id(0)
        kvh = tl.program_id(1)
        rows, row_ok, tok, head, q = _load_q(
            q_ptr, pid_m, kvh, n_rows, group, stride_qc, stride_qh, HEAD_DIM, BLOCK_M, UPCAST
        )
        best_v, best_i, thr, worst_i = _empty_lists(row_ok, TOPK, TOPK_PAD, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        slots = tl.arange(0, TOPK_PAD)
        if FILTER >= 1:
            tau = tl.load(tau_ptr + kvh * rows_pad + rows, mask=row_ok, other=float("inf"))
        if FILTER == 1 or FILTER == 3:
            picked = tl.arange(0, PICK_PAD)
            row_off = (kvh * rows_pad + rows).to(tl.int64)[:, None] * PICK_PAD
            own = tl.load(picks_ptr + row_off + picked[None, :], mask=row_ok[:, None], other=2147483647)

        blk = kvh * n_blocks + pid_m
        count = tl.minimum(tl.load(count_ptr + blk), n_ids)
        ids = ids_ptr + blk.to(tl.int64) * n_ids
        offs_n = tl.arange(0, BLOCK_N)
        k_head = k_ptr + kvh * stride_kh + dims[:, None]
        for i in range(0, count):
            tile = tl.load(ids + i)
            base = start + tile * BLOCK_N
            keys = base + offs_n
            col_ok = keys < end
            kt = tl.load(k_head + keys.to(tl.int64)[None, :] * stride_kn, mask=col_ok[None, :], other=0.0)
            s = _score(q, kt, UPCAST, IEEE)
            if FILTER == 1:
                # Never ``s >= tau`` alone: pass 2 recomputes with another tile shape, so a row's
                # winner at ``tau`` can come out a few ulps below it (DESIGN.md section 7).
                mine = tl.max((own == tile).to(tl.int32), axis=1) > 0
                keep = col_ok[None, :] & ((s >= tau[:, None]) | mine[:, None])
            elif FILTER == 2:  # session 4's filter, inexact: a benchmark baseline only
                keep = col_ok[None, :] & (s >= tau[:, None])
            elif FILTER == 3:
                mine = tl.max((own == tile).to(tl.int32), axis=1) > 0
                keep = col_ok[None, :] & mine[:, None]
            else:
                keep = col_ok[None, :]
            s = tl.where(keep, s, float("-inf"))
            best_v, best_i, thr, worst_i = _merge_tile(s, offs_n, base, best_v, best_i, thr, worst_i, MERGE)

        v = tl.where((best_i < 0) | (slots[None, :] >= TOPK), float("-inf"), best_v)
        ix = tl.where(best_i < 0, -1, best_i).to(tl.int64)
        _store_sorted(v, ix, out_v_ptr, out_i_ptr, tok * stride_oc + head * stride_oh, row_ok, TOPK)


def _two_pass(q, k, start, end, topk, splits, cfg):
    """Top-k by tile maxima first; returns the sorted ``[c, H, topk]`` scores and indices.

    Pass 1 keeps, per row and split, the four largest tile maxima and their tiles (ties to the
    earlier tile). A small kernel picks each row's k best of those over all splits (max descending,
    then tile ascending), its bound ``tau`` (the k-th of their maxima), and lists per block of
    ``BLOCK_M2`` rows the union of its rows' picks; pass 2 scores only the listed tiles, in key
    order, with the one-pass kernel's exact merge. A row merges (``FILTER`` 1) every key of its own
    k picked tiles plus the keys of the block's other tiles that score at least ``tau``, or
    (``FILTER`` 0) every key of every listed tile. Call ``S`` the keys a row merges; its result is
    the exact top-k of ``S`` by pass 2's scores.

    Why that is the top-k of all keys. Pass 2 recomputes scores with another tile shape (and
    warps), so its score of a key may differ from pass 1's in the last bits; nothing below assumes
    they agree. Let ``x`` be a key's exact score and ``e`` a bound on the error of any computed
    score (fp32 sums of d products: ``e <= ~d * 2^-24 * sum_i |q_i k_i|``). First, a tile the row
    did not pick has its pass-1 max at most ``tau``: if listed among its candidates, the k picked
    come before it; if not, its split kept four (>= k) candidates at or above it, so the k-th
    overall is too. Hence every key outside ``S`` has ``x <= tau + e`` (its tile was not picked, and
    with ``FILTER`` 1 a key of a listed tile is left out only below ``tau``).

    * No -1 where the row has >= k keys: the row's own picked tiles are all in ``S``. If it has at
      least k non-empty tiles it picks k distinct ones, each holding a key; if fewer, every split
      kept all of its (< 4) tiles, so it picks them all, i.e. all of its keys.
    * In exact arithmetic (``e = 0``, e.g. integer-valued data) the result is the reference's:
      the k picked maxima are k distinct keys reaching ``tau``, so the k-th best score is ``>= tau``,
      and every key outside ``S`` scores ``<= tau`` and, if equal, comes after the picked keys at
      ``tau`` (the earliest tiles at ``tau`` are picked, and tiles hold ascending keys). So ``S``
      holds the true top-k, ties included, and the top-k of a subset holding it is the same.
    * With rounding: the maxima of the k picked tiles are k keys of ``S`` with ``x >= tau - e``,
      so pass 2 scores them ``>= tau - 2e`` and the weakest key returned has ``x >= tau - 3e``. A
      key the reference keeps and we do not is either outside ``S`` (``x <= tau + e``: within
      ``4e`` of the weakest key returned) or lost inside ``S`` to a key whose pass-2 score beats
      its own (exact scores within ``2e``). So results differ from the reference only between keys
      whose exact scores lie within ``4e`` of each other (``6e`` in the reference's fp32 scores),
      as the one-pass kernel's may within ``2e``; every score returned is pass 2's score of the key
      returned.

    The bound ``tau`` is only a filter (it cuts merge work in the other rows' tiles); ``FILTER`` 0,
    the default, skips it: on an H200 it was as fast as session 4's inexact filter and faster than
    ``FILTER`` 1 at every benchmark point (kernels/NOTES.md, session 5).
    """
    plan = _first_pass(q, k, start, end, topk, splits, cfg)
    return _second_pass(q, k, start, end, topk, cfg, plan)


def _first_pass(q, k, start, end, topk, splits, cfg):
    """Pass 1 and the plan: ``(tau, picks, ids, count)``, as :func:`_plan_kernel` writes them
    (``tau`` [Hkv, rows_pad] fp32, ``picks`` [Hkv, rows_pad, TOPK_PAD], ``ids`` [Hkv, n_blocks,
    BLOCK_M2 * TOPK_PAD], ``count`` [Hkv, n_blocks], int32)."""
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    n_rows, n_keys = g * c, end - start
    block_m, block_n, block_m2 = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_M2"]
    assert block_m % block_m2 == 0, f"BLOCK_M {block_m} must be a multiple of BLOCK_M2 {block_m2}"
    row_blocks = triton.cdiv(n_rows, block_m)
    rows_pad = row_blocks * block_m
    if splits is None:
        splits = _default_splits(n_keys, row_blocks * Hkv, block_n, 4, _sm_count(q.device))
    splits, split_len = _split(n_keys, splits, block_n)

    cand_a = torch.empty((Hkv, rows_pad, splits * 4), dtype=torch.float32, device=q.device)
    cand_t = torch.empty((Hkv, rows_pad, splits * 4), dtype=torch.int32, device=q.device)
    _tile_max_kernel[(row_blocks, splits, Hkv)](
        q, k, cand_a, cand_t,
        n_rows, g, start, end, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cand_a.stride(0), cand_a.stride(1),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=INTERPRETED, IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return _plan(cand_a, cand_t, topk, block_m2)


def _plan(cand_a, cand_t, keep, block_m2):
    """:func:`_plan_kernel` over pass 1's candidates ``cand_a``/``cand_t`` [Hkv, rows_pad, n_cand]
    (fp32 tile maxima, int32 tiles, contiguous): each row's ``keep`` best tiles, per block of
    ``block_m2`` rows. Returns ``(tau, picks, ids, count)`` as :func:`_first_pass`."""
    Hkv, rows_pad, n_cand = cand_a.shape
    n_blocks, keep_pad = rows_pad // block_m2, max(2, _next_pow2(keep))
    dev = cand_a.device
    tau = torch.empty((Hkv, rows_pad), dtype=torch.float32, device=dev)
    picks = torch.empty((Hkv, rows_pad, keep_pad), dtype=torch.int32, device=dev)
    ids = torch.empty((Hkv, n_blocks, block_m2 * keep_pad), dtype=torch.int32, device=dev)
    count = torch.empty((Hkv, n_blocks), dtype=torch.int32, device=dev)
    # The repeat test is [n, n] over the block's n = block_m2 * keep_pad picks: the exact path
    # (keep <= 4) keeps its one warp; the FP8 path's longer lists take more.
    warps = 1 if keep_pad <= 4 else min(8, block_m2 * keep_pad // 32)
    _plan_kernel[(n_blocks, Hkv)](
        cand_a, cand_t, tau, picks, ids, count, n_cand, rows_pad, n_blocks,
        TOPK=keep, TOPK_PAD=keep_pad, BLOCK_M=block_m2, CAND_PAD=_next_pow2(n_cand), num_warps=warps,
    )  # fmt: skip
    return tau, picks, ids, count


def _second_pass(q, k, start, end, topk, cfg, plan):
    """Pass 2 over the tiles ``plan`` (from :func:`_first_pass`, or the FP8 pass of :mod:`.fp8`)
    lists: sorted ``[c, H, topk]``."""
    tau, picks, ids, count = plan
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    n_blocks, rows_pad = ids.shape[1], tau.shape[1]
    out_v = torch.empty((c, H, topk), dtype=torch.float32, device=q.device)
    out_i = torch.empty((c, H, topk), dtype=torch.int64, device=q.device)
    filt = cfg.get("FILTER", 0)
    topk_pad = max(2, _next_pow2(topk))
    assert filt != 1 or picks.shape[-1] == topk_pad, "FILTER 1 takes the row's k picks"
    _revisit_kernel[(n_blocks, Hkv)](
        q, k, tau, picks, ids, count, out_v, out_i,
        g * c, g, start, end, ids.shape[-1], n_blocks, rows_pad,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out_v.stride(0), out_v.stride(1),
        HEAD_DIM=d, TOPK=topk, TOPK_PAD=topk_pad, PICK_PAD=picks.shape[-1], BLOCK_M=cfg["BLOCK_M2"],
        BLOCK_N=cfg["BLOCK_N"], UPCAST=INTERPRETED, IEEE=q.dtype == torch.float32, MERGE=cfg.get("MERGE", 0),
        FILTER=filt, num_warps=cfg.get("num_warps2", 1), num_stages=cfg.get("num_stages2", 3),
    )  # fmt: skip
    return out_v, out_i
