"""Exact score + top-k of un-rotated queries against one rank's keys.

For every query head ``h`` and query token ``i``, over the keys ``j`` in ``[start, end)``:
``s[i, h, j] = q[i, h] . k[j, h // group]`` (no 1/sqrt(d) scale, no softmax), and the ``topk``
largest scores with their key indices. Ties go to the lower key index; results are ordered by
score descending, then index ascending. Where fewer than ``topk`` keys exist, the tail is padded
with score ``-inf`` and index ``-1``.

The ``[c, N]`` score matrix is never materialized: the reference walks the keys in blocks and
keeps a running top-k; the Triton kernel keeps it in registers.

Kernel layout: one program per (block of ``BLOCK_M`` query rows of one KV head, split of the key
range, KV head). The rows of a KV head are its ``g * c`` query rows (GQA packing: one K tile serves
all heads of the group), row ``r = i * g + gi`` for token ``i`` and head ``kvh * g + gi``. Each
program walks its split in tiles of ``BLOCK_N`` keys, scores a tile with ``tl.dot`` (fp32
accumulate) and merges it into a per-row top-k list; a tile whose rows all stay at or below their
k-th best costs one row max. Each split writes an unsorted partial list; a second small kernel merges
the ``splits * topk`` candidates of each row into the sorted result.
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
    q: torch.Tensor, k: torch.Tensor, start: int, end: int, topk: int, block: int = REF_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch exact score + top-k (the definition the Triton kernel must match).

    Args:
        q: ``[c, H, d]`` un-rotated queries (any float dtype; computed in fp32).
        k: ``[N, Hkv, d]`` un-rotated keys of this rank; ``H % Hkv == 0``.
        start, end: key rows ``[start, end)`` to score, ``0 <= start <= end <= N``.
        topk: keys kept per (query token, query head), ``>= 1``.
        block: keys scored per step (bounds the transient ``[H, c, block]`` scores).

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64 row indices into ``k``.
    """
    c, H, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    assert H % Hkv == 0 and k.shape[2] == d and 0 <= start <= end <= k.shape[0] and topk >= 1
    qf = q.float().reshape(c, Hkv, g, d).permute(1, 2, 0, 3).reshape(Hkv, g * c, d)  # [Hkv, g*c, d]
    best_s = qf.new_full((Hkv, g * c, topk), float("-inf"))
    best_i = torch.full((Hkv, g * c, topk), -1, dtype=torch.int64, device=q.device)
    for b0 in range(start, end, block):
        b1 = min(b0 + block, end)
        kb = k[b0:b1].float().permute(1, 2, 0)  # [Hkv, d, B]
        s = torch.bmm(qf, kb)  # [Hkv, g*c, B]
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
    ):
        """Partial top-k of one (row block, key split, KV head): writes ``part_*[i, h, split, :TOPK]``."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        kvh = tl.program_id(2)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = token * group + head-in-group
        row_ok = rows < n_rows
        tok = (rows // group).to(tl.int64)
        head = kvh * group + rows % group
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qc + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM]
        if UPCAST:  # interpreter: tl.dot on bf16 is wrong there
            q = q.to(tl.float32)

        # Slots past TOPK (and all slots of padding rows) hold +inf so they are never the worst;
        # empty slots hold -inf and distinct negative indices.
        slots = tl.arange(0, TOPK_PAD)
        best_v = tl.where(row_ok[:, None] & (slots[None, :] < TOPK), float("-inf"), float("inf"))
        best_i = tl.zeros([BLOCK_M, TOPK_PAD], dtype=tl.int32) - 1 - slots[None, :]
        thr = tl.min(best_v, axis=1)
        worst_i = tl.max(tl.where(best_v == thr[:, None], best_i, -2147483647), axis=1)

        lo = start + pid_s * split_len
        hi = tl.minimum(lo + split_len, end)
        n_full = tl.maximum(hi - lo, 0) // BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)
        # 64-bit base: N * Hkv * d overflows int32 at a few million keys.
        k_tile = k_ptr + kvh * stride_kh + lo.to(tl.int64) * stride_kn
        k_tile += offs_n[None, :] * stride_kn + dims[:, None]  # [HEAD_DIM, BLOCK_N] pointers
        for t in range(0, n_full):
            kt = tl.load(k_tile)  # [HEAD_DIM, BLOCK_N]
            if UPCAST:
                kt = kt.to(tl.float32)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)  # [BLOCK_M, BLOCK_N] fp32
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
            kt = tl.load(k_tile, mask=col_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
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
        o_off = rows.to(tl.int64) * TOPK
        for r in tl.static_range(TOPK):
            m = tl.max(v, axis=1)
            # Candidate indices are distinct (padding is -1 at -inf), so the lowest index among the
            # row maxima names one candidate; once only padding is left this gives (-inf, -1).
            j = tl.min(tl.where(v == m[:, None], ix, 9223372036854775807), axis=1)
            tl.store(out_v_ptr + o_off + r, m, mask=row_ok)
            tl.store(out_i_ptr + o_off + r, j, mask=row_ok)
            v = tl.where(ix == j[:, None], float("-inf"), v)

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


def _default_config(n_rows: int, head_dim: int, topk: int) -> dict:
    """Tile shapes by the rows one KV head serves (``g * c``): few in decode, many in prefill."""
    if INTERPRETED:  # every program costs ~2 ms there; small tiles keep the masked paths exercised
        return {
            "BLOCK_M": max(16, min(32, _next_pow2(n_rows))),
            "BLOCK_N": 32,
            "num_warps": 4,
            "num_stages": 1,
        }
    # From the H100 sweeps (kernels/NOTES.md): the top-k merge, not the dot, sets the time. A tile
    # of 64 x 64 has a quarter of the rows x keys of 128 x 128 per "does any row need an update"
    # test, so far fewer tiles take the merge path; at d = 128 with topk <= 4 updates are rare
    # enough that 128 x 128 (the faster dot) wins. The packed one-pass merge (MERGE 0) wins in
    # prefill; decode keeps v2's two-pass fast path (MERGE 1).
    if n_rows <= 16:  # decode: bandwidth-bound
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "MERGE": 1}
    if head_dim >= 128 and topk <= 4 and n_rows >= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "MERGE": 0}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "MERGE": 0}


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


def score_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    end: int,
    topk: int,
    *,
    splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton score + top-k; same contract and results as :func:`score_topk_ref`.

    Args:
        q: ``[c, H, d]`` un-rotated queries, fp16/bf16 (fp32 too), last dim contiguous.
        k: ``[N, Hkv, d]`` keys of this rank, same dtype and device, last dim contiguous.
        start, end: key rows ``[start, end)``; ``0 <= start <= end <= N``.
        topk: keys kept per (token, head), ``1 <= topk <= MAX_TOPK``.
        splits: key-range splits per row block (default: enough to fill the GPU).
        config: overrides of ``BLOCK_M``, ``BLOCK_N`` (<= 256), ``num_warps``, ``num_stages``,
            ``MERGE`` (0: one packed pass finds the single entry above a row's threshold, the
            default; 1: two passes) and ``SCORE_ONLY`` (benchmark floor: scores only, wrong
            results); for benchmarks.

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
    assert 0 <= start <= end <= N < 2**31, (start, end, N)
    assert 1 <= topk <= MAX_TOPK, f"topk must be in [1, {MAX_TOPK}], got {topk}"

    g = H // Hkv
    n_rows, n_keys = g * c, end - start
    cfg = {**_default_config(n_rows, d, topk), **(config or {})}
    unknown = set(cfg) - {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "MERGE", "SCORE_ONLY"}
    assert not unknown, f"unknown config keys: {sorted(unknown)}"
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert block_n <= 256, f"BLOCK_N {block_n} > 256: the packed count/column sum would overflow"
    topk_pad = max(2, _next_pow2(topk))
    row_blocks = triton.cdiv(n_rows, block_m)
    if splits is None:
        splits = _default_splits(n_keys, row_blocks * Hkv, block_n, topk_pad, _sm_count(q.device))
    # Whole tiles per split; drop splits that would be left empty.
    split_len = triton.cdiv(triton.cdiv(max(n_keys, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(n_keys, split_len))
    assert splits * topk_pad <= MAX_CANDIDATES and splits <= 65535, f"too many splits: {splits}"

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
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

    out_v = torch.empty((c, H, topk), dtype=torch.float32, device=q.device)
    out_i = torch.empty((c, H, topk), dtype=torch.int64, device=q.device)
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
