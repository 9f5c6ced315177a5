"""Exact score + top-k of un-rotated queries against one rank's keys.

For every query head ``h`` and query token ``i``, over the keys ``j`` in ``[start, end)``:
``s[i, h, j] = q[i, h] . k[j, h // group]`` (no 1/sqrt(d) scale, no softmax), and the ``topk``
largest scores with their key indices. Ties go to the lower key index; results are ordered by
score descending, then index ascending. Where fewer than ``topk`` keys exist, the tail is padded
with score ``-inf`` and index ``-1``.

The ``[c, N]`` score matrix is never materialized: the reference walks the keys in blocks and
keeps a running top-k; the Triton kernel keeps it in registers.

Two Triton paths, the same results:

* One-pass (decode, and topk > 4): one program per (block of ``BLOCK_M`` query rows of one KV
  head, split of the key range, KV head). The rows of a KV head are its ``g * c`` query rows (GQA
  packing: one K tile serves all heads of the group), row ``r = i * g + gi`` for token ``i`` and
  head ``kvh * g + gi``. Each program walks its split in tiles of ``BLOCK_N`` keys, scores a tile
  with ``tl.dot`` (fp32 accumulate) and merges it into a per-row top-k list; a tile whose rows all
  stay at or below their k-th best costs one row max. Each split writes an unsorted partial list; a
  second small kernel merges the ``splits * topk`` candidates of each row into the sorted result.
* Two-pass (prefill at topk <= 4, the default there): the same programs keep only each row's four
  largest tile maxima (no merge in the scan); a small kernel picks each row's k best tiles; a
  second pass runs the exact merge over just those tiles (a row's own picked tiles whole). See
  :func:`_two_pass` for why no winner can be missed, whatever the rounding of either pass.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux-only dependency; the reference still works without it
    triton = None

# Keys per block in the pure-torch reference: the transient score block is
# [H, c, REF_BLOCK] fp32, 75 MB at c = 512, H = 9.
REF_BLOCK = 4096
# The reference's key blocks are padded to a multiple of this many columns. A BLAS GEMM rounds a
# column's dot products differently at the ragged edge of its tiles (MKL on AVX2, keys laid out as the
# cache holds them, 2 query rows, d = 16: identical keys at rows 1 and N - 1 scored differently in
# 74 % of 2,400 draws with N = 20..139; padded, in none), so two copies of one key
# (a token repeated in the prompt: layer 0's keys depend on the token alone) could tie on one rank
# and not on another, and the tie would be broken by rounding instead of by index. With every GEMM's
# key count a multiple of 64 and the keys in one memory layout (a padded copy and a view of the
# cache once met different GEMM kernels), a key's score does not depend on its column, the block's
# length or the thread count (tests/test_kernel_score_topk.py::test_ref_scores_a_key_the_same_anywhere).
REF_COLUMNS = 64


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


def _block_topk(s: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``kk`` of each row of ``s`` [..., B], ties to the lower column."""
    B = s.shape[-1]
    vals, idx = s.topk(min(kk + 1, B), dim=-1, sorted=True)
    if B == kk:
        return vals, idx
    # torch.topk breaks ties arbitrarily; that only matters where the kk-th value is tied with
    # values left out, i.e. where the (kk+1)-th equals the kk-th. Redo those rows with a stable sort.
    tied = vals[..., kk] == vals[..., kk - 1]
    vals, idx = vals[..., :kk].clone(), idx[..., :kk].clone()
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        v2, i2 = s[rows].sort(dim=-1, descending=True, stable=True)
        vals[rows], idx[rows] = v2[..., :kk], i2[..., :kk]
    return vals, idx


def score_topk_ref(
    q: torch.Tensor, k: torch.Tensor, start: int, end: int | torch.Tensor, topk: int, block: int = REF_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch exact score + top-k (the definition the Triton kernel must match).

    Args:
        q: ``[c, H, d]`` un-rotated queries (any float dtype; computed in fp32).
        k: ``[N, Hkv, d]`` un-rotated keys of this rank; ``H % Hkv == 0``.
        start, end: key rows ``[start, end)`` to score, ``0 <= start <= end <= N`` (``end`` may be a
            one-element tensor, as for :func:`score_topk`).
        topk: keys kept per (query token, query head), ``>= 1``.
        block: keys scored per step (bounds the transient ``[H, c, block]`` scores).

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64 row indices into ``k``.
    """
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    end = int(end)  # a one-element tensor too (the kernel's device end; here it waits for the device)
    assert H % Hkv == 0 and k.shape[2] == d and 0 <= start <= end <= k.shape[0] and topk >= 1
    qf = q.float().reshape(c, Hkv, g, d).permute(1, 2, 0, 3).reshape(Hkv, g * c, d)  # [Hkv, g*c, d]
    best_s = qf.new_full((Hkv, g * c, topk), float("-inf"))
    best_i = torch.full((Hkv, g * c, topk), -1, dtype=torch.int64, device=q.device)
    for b0 in range(start, end, block):
        b1 = min(b0 + block, end)
        kb = k[b0:b1].float().contiguous()  # [B, Hkv, d]
        pad = -(b1 - b0) % REF_COLUMNS  # zero keys, and every block in the same memory layout
        kb = torch.nn.functional.pad(kb, (0, 0, 0, 0, 0, pad)) if pad else kb
        s = torch.bmm(qf, kb.permute(1, 2, 0))[..., : b1 - b0]  # [Hkv, g*c, B]
        vs, ix = _block_topk(s, min(topk, b1 - b0))
        best_s, best_i = sort_topk(torch.cat([best_s, vs], -1), torch.cat([best_i, ix + b0], -1), topk)
    # [Hkv, g*c, topk] -> [c, H, topk], with h = kvh * g + gi
    best_s = best_s.reshape(Hkv, g, c, topk).permute(2, 0, 1, 3).reshape(c, H, topk)
    best_i = best_i.reshape(Hkv, g, c, topk).permute(2, 0, 1, 3).reshape(c, H, topk)
    return best_s.contiguous(), best_i.contiguous()


# Largest topk the kernel keeps in registers (the list is [BLOCK_M, next_pow2(topk)]).
MAX_TOPK = 32
# Most candidates per row the merge kernel holds (splits * next_pow2(topk)).
MAX_CANDIDATES = 4096

# True when triton.jit gave interpreted functions (TRITON_INTERPRET=1 was set before triton was
# imported): the kernel then runs on CPU tensors; otherwise it runs compiled on CUDA tensors.
INTERPRETED = False

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
    def _load_q(q_ptr, pid_m, kvh, n_rows, group, stride_qc, stride_qh, HEAD_DIM, BLOCK_M, UPCAST):
        """One block of GQA-packed query rows of KV head ``kvh``: returns ``(rows, row_ok, tok, head,
        q)``, ``q`` [BLOCK_M, HEAD_DIM] (zeros past ``n_rows``)."""
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = token * group + head-in-group
        row_ok = rows < n_rows
        tok = (rows // group).to(tl.int64)
        head = kvh * group + rows % group
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qc + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        if UPCAST:  # interpreter: tl.dot on bf16 is wrong there
            q = q.to(tl.float32)
        return rows, row_ok, tok, head, q

    @triton.jit
    def _split_tiles(k_ptr, kvh, pid_s, start, end, split_len, stride_kn, stride_kh, HEAD_DIM, BLOCK_N):
        """Split ``pid_s`` of the key range: ``(lo, hi, n_full, offs_n, k_tile)``, its keys
        ``[lo, hi)``, its whole tiles and the [HEAD_DIM, BLOCK_N] pointers of its first tile."""
        lo = start + pid_s * split_len
        hi = tl.minimum(lo + split_len, end)
        n_full = tl.maximum(hi - lo, 0) // BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        # 64-bit base: N * Hkv * d overflows int32 at a few million keys.
        k_tile = k_ptr + kvh * stride_kh + lo.to(tl.int64) * stride_kn
        k_tile += offs_n[None, :] * stride_kn + dims[:, None]
        return lo, hi, n_full, offs_n, k_tile

    @triton.jit
    def _score(q, kt, UPCAST, IEEE):
        """``q @ kt`` in fp32 ([BLOCK_M, HEAD_DIM] x [HEAD_DIM, BLOCK_N])."""
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        return s

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
        cand_a_ptr,
        cand_t_ptr,
        tau_ptr,
        picks_ptr,
        ids_ptr,
        count_ptr,
        n_cand,
        rows_pad,
        n_blocks,
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
        baseline only, not exact): session 4's ``s >= tau`` alone."""
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
        if FILTER == 1:
            row_off = (kvh * rows_pad + rows).to(tl.int64)[:, None] * TOPK_PAD
            own = tl.load(picks_ptr + row_off + slots[None, :], mask=row_ok[:, None], other=2147483647)

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
            else:
                keep = col_ok[None, :]
            s = tl.where(keep, s, float("-inf"))
            best_v, best_i, thr, worst_i = _merge_tile(s, offs_n, base, best_v, best_i, thr, worst_i, MERGE)

        v = tl.where((best_i < 0) | (slots[None, :] >= TOPK), float("-inf"), best_v)
        ix = tl.where(best_i < 0, -1, best_i).to(tl.int64)
        _store_sorted(v, ix, out_v_ptr, out_i_ptr, tok * stride_oc + head * stride_oh, row_ok, TOPK)

    INTERPRETED = type(_score_topk_kernel).__name__ == "InterpretedFunction"


def supports(device: torch.device | str) -> bool:
    """Whether :func:`score_topk` runs on tensors of ``device`` in this process.

    Compiled Triton takes CUDA tensors; the interpreter (``TRITON_INTERPRET=1`` set before triton was
    first imported) takes CPU tensors. Callers fall back to :func:`score_topk_ref` elsewhere.
    """
    if triton is None:
        return False
    return torch.device(device).type == ("cpu" if INTERPRETED else "cuda")


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def default_config(n_rows: int, head_dim: int, topk: int, two_pass: bool | None = None) -> dict:
    """Launch config by the rows one KV head serves (``g * c``: few in decode, many in prefill).

    ``two_pass`` None picks the path: two-pass for prefill at ``topk <= 4``, one-pass elsewhere.
    """
    if two_pass is None:
        two_pass = topk <= 4 and n_rows >= TWO_PASS_MIN_ROWS
    if INTERPRETED:  # every program costs ~2 ms there; small tiles keep the masked paths exercised
        cfg = {"BLOCK_M": max(16, min(32, _next_pow2(n_rows))), "BLOCK_N": 32, "num_warps": 4, "num_stages": 1,
               "TWO_PASS": two_pass}  # fmt: skip
        return {**cfg, "BLOCK_M2": 16, "FILTER": 0} if two_pass else cfg
    # From the H100 sweeps (kernels/NOTES.md). The two-pass path's first pass has no merge, so it
    # takes the tiles where the dot is fastest (256 x 64). In the one-pass kernel the merge, not the
    # dot, sets the time: a tile of 64 x 64 has a quarter of the rows x keys of 128 x 128 per "does
    # any row need an update" test, so far fewer tiles take the merge path; at d = 128 with topk <= 4
    # updates are rare enough that 128 x 128 wins. The packed one-pass merge (MERGE 0) wins in
    # prefill; decode keeps v2's two-pass fast path (MERGE 1).
    if two_pass:
        return {"BLOCK_M": min(256, max(16, _next_pow2(n_rows))), "BLOCK_N": 64,
                "num_warps": 8 if head_dim >= 128 else 4, "num_stages": 3, "TWO_PASS": True, "BLOCK_M2": 16,
                "num_warps2": 1, "num_stages2": 3, "FILTER": 0}  # fmt: skip
    if n_rows <= 16:  # decode: bandwidth-bound
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "MERGE": 1, "TWO_PASS": False}
    if head_dim >= 128 and topk <= 4 and n_rows >= 128:
        return {
            "BLOCK_M": 128,
            "BLOCK_N": 128,
            "num_warps": 4,
            "num_stages": 2,
            "MERGE": 0,
            "TWO_PASS": False,
        }
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "MERGE": 0, "TWO_PASS": False}


# Prefill (rows per KV head, g * c) from which topk <= 4 takes the two-pass path by default.
TWO_PASS_MIN_ROWS = 128
# Tile number that names no tile (sorts after every real one).
NO_TILE = 2**31 - 1
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "MERGE", "SCORE_ONLY", "TWO_PASS",
                "BLOCK_M2", "num_warps2", "num_stages2", "FILTER"}  # fmt: skip

_SM_COUNT: dict[int, int] = {}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _sm_count(device: torch.device) -> int:
    if INTERPRETED:
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _default_splits(n_keys: int, programs_per_split: int, block_n: int, topk_pad: int, sms: int) -> int:
    """Key splits: enough programs for about 4 per SM (decode has only Hkv row blocks), but each split
    at least 8 tiles long (every split warms its own top-k up) and at most MAX_CANDIDATES per row."""
    if INTERPRETED:
        return max(1, min(2, triton.cdiv(n_keys, block_n)))
    want = round(4 * sms / programs_per_split)  # rounded: 512 programs on 132 SMs stay one split
    return max(1, min(want, n_keys // (8 * block_n), MAX_CANDIDATES // topk_pad))


def _split(n_keys: int, splits: int, block_n: int) -> tuple[int, int]:
    """``(splits, split_len)``: whole tiles per split, and no split left empty."""
    split_len = triton.cdiv(triton.cdiv(max(n_keys, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(n_keys, split_len))
    assert splits <= 65535, f"too many splits: {splits}"
    return splits, split_len


def score_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    end: int | torch.Tensor,
    topk: int,
    *,
    splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton score + top-k; same contract and results as :func:`score_topk_ref`.

    Args:
        q: ``[c, H, d]`` un-rotated queries, fp16/bf16 (fp32 too), last dim contiguous.
        k: ``[N, Hkv, d]`` keys of this rank, same dtype and device, last dim contiguous.
        start, end: key rows ``[start, end)``; ``0 <= start <= end <= N``. ``end`` may be a
            one-element integer tensor on the device (CUDA-graph decode): the kernel reads it there
            and the launch, sized for ``[start, N)``, never changes; the caller keeps it in range
            (nothing is checked on the host) and it takes the one-pass path.
        topk: keys kept per (token, head), ``1 <= topk <= MAX_TOPK``.
        splits: key-range splits per row block (default: enough to fill the GPU).
        config: overrides, for benchmarks: ``BLOCK_M``, ``BLOCK_N`` (<= 256), ``num_warps``,
            ``num_stages``; ``TWO_PASS`` (topk <= 4 only: tile maxima first, then an exact top-k
            over the tiles that can hold a winner; the prefill default), with ``BLOCK_M2``,
            ``num_warps2`` and ``num_stages2`` for its second pass and ``FILTER`` for what the
            second pass merges (0, the default: all keys of all listed tiles; 1: a row takes all
            keys of its own k picked tiles and the keys of its block's other listed tiles that
            score at least its bound ``tau``; both exact, see :func:`_two_pass`; 2: only keys at or
            above ``tau``, session 4's filter, NOT exact, a same-run baseline for benchmarks like
            ``SCORE_ONLY``); for the one-pass kernel ``MERGE`` (0: one packed
            pass finds the single entry above a row's threshold, the default; 1: two passes) and
            ``SCORE_ONLY`` (benchmark floor: scores only, wrong results).

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64, as :func:`score_topk_ref`.
    """
    assert triton is not None, "score_topk needs triton; use score_topk_ref"
    assert q.dim() == 3 and k.dim() == 3, f"q [c, H, d] and k [N, Hkv, d], got {q.shape}, {k.shape}"
    c, H, d = q.shape
    N, Hkv, dk = k.shape
    assert dk == d and Hkv >= 1 and H % Hkv == 0, f"heads/dims mismatch: q {q.shape}, k {k.shape}"
    assert c >= 1 and d >= 16 and d & (d - 1) == 0, f"need c >= 1, power-of-two head_dim >= 16: {q.shape}"
    assert q.dtype == k.dtype and q.dtype in _DTYPES, (q.dtype, k.dtype)
    assert q.device == k.device, (q.device, k.device)
    where = "cpu (TRITON_INTERPRET=1)" if INTERPRETED else "cuda"
    assert supports(q.device), f"score_topk runs on {where} tensors in this process, got {q.device}"
    assert q.stride(2) == 1 and k.stride(2) == 1, "last dim of q and k must be contiguous"
    on_device = isinstance(end, torch.Tensor)
    if on_device:
        assert end.numel() == 1 and end.device == q.device and not end.is_floating_point(), end
        assert 0 <= start <= N < 2**31, (start, N)
    else:
        assert 0 <= start <= end <= N < 2**31, (start, end, N)
    assert 1 <= topk <= MAX_TOPK, f"topk must be in [1, {MAX_TOPK}], got {topk}"

    g = H // Hkv
    n_rows = g * c
    two_pass = False if on_device else (config or {}).get("TWO_PASS")
    cfg = {**default_config(n_rows, d, topk, two_pass), **(config or {})}
    unknown = set(cfg) - _CONFIG_KEYS
    assert not unknown, f"unknown config keys: {sorted(unknown)}"
    assert cfg["BLOCK_N"] <= 256, (
        f"BLOCK_N {cfg['BLOCK_N']} > 256: the packed count/column sum would overflow"
    )
    if cfg.get("TWO_PASS"):
        assert not on_device, "TWO_PASS needs a host end row: a device end takes the one-pass path"
        assert topk <= 4, f"TWO_PASS keeps four tile maxima per row: topk {topk} > 4"
        assert not cfg.get("SCORE_ONLY"), "SCORE_ONLY is a one-pass option: add TWO_PASS=False"
        assert cfg.get("FILTER", 0) in (0, 1, 2), f"FILTER is 0, 1 or 2, got {cfg.get('FILTER')}"
        return _two_pass(q, k, start, end, topk, splits, cfg)
    assert "FILTER" not in cfg, "FILTER is a two-pass option: add TWO_PASS=True (topk <= 4)"
    part_v, part_i = _one_pass(q, k, start, end, topk, splits, cfg)

    out_v = torch.empty((c, H, topk), dtype=torch.float32, device=q.device)
    out_i = torch.empty((c, H, topk), dtype=torch.int64, device=q.device)
    n_cand = part_v.shape[2] * topk
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


def _one_pass(q, k, start, end, topk, splits, cfg):
    """Unsorted top-k per (token, head, split): ``[c, H, splits, topk]`` scores and indices."""
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
    return part_v, part_i


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
    n_blocks, topk_pad = rows_pad // block_m2, max(2, _next_pow2(topk))
    tau = torch.empty((Hkv, rows_pad), dtype=torch.float32, device=q.device)
    picks = torch.empty((Hkv, rows_pad, topk_pad), dtype=torch.int32, device=q.device)
    ids = torch.empty((Hkv, n_blocks, block_m2 * topk_pad), dtype=torch.int32, device=q.device)
    count = torch.empty((Hkv, n_blocks), dtype=torch.int32, device=q.device)
    _plan_kernel[(n_blocks, Hkv)](
        cand_a, cand_t, tau, picks, ids, count, splits * 4, rows_pad, n_blocks,
        TOPK=topk, TOPK_PAD=topk_pad, BLOCK_M=block_m2, CAND_PAD=_next_pow2(splits * 4), num_warps=1,
    )  # fmt: skip
    return tau, picks, ids, count


def _second_pass(q, k, start, end, topk, cfg, plan):
    """Pass 2 over the tiles ``plan`` (from :func:`_first_pass`) lists: sorted ``[c, H, topk]``."""
    tau, picks, ids, count = plan
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    n_blocks, rows_pad = ids.shape[1], tau.shape[1]
    out_v = torch.empty((c, H, topk), dtype=torch.float32, device=q.device)
    out_i = torch.empty((c, H, topk), dtype=torch.int64, device=q.device)
    _revisit_kernel[(n_blocks, Hkv)](
        q, k, tau, picks, ids, count, out_v, out_i,
        g * c, g, start, end, ids.shape[-1], n_blocks, rows_pad,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out_v.stride(0), out_v.stride(1),
        HEAD_DIM=d, TOPK=topk, TOPK_PAD=picks.shape[-1], BLOCK_M=cfg["BLOCK_M2"], BLOCK_N=cfg["BLOCK_N"],
        UPCAST=INTERPRETED, IEEE=q.dtype == torch.float32, MERGE=cfg.get("MERGE", 0),
        FILTER=cfg.get("FILTER", 0), num_warps=cfg.get("num_warps2", 1), num_stages=cfg.get("num_stages2", 3),
    )  # fmt: skip
    return out_v, out_i
