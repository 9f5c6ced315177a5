"""What the score + top-k kernels share: the Triton import, where they run, and the scan's pieces.

One layout for every kernel file: queries ``q`` [c, H, d] and keys ``k`` [N, Hkv, d], last dim
contiguous, ``g = H // Hkv``. The rows of a KV head are its ``g * c`` query rows (GQA packing: one K
tile serves all heads of the group), row ``r = i * g + gi`` for token ``i`` and head ``kvh * g + gi``.
A program scans one split of the key range ``[start, end)`` in tiles of ``BLOCK_N`` keys.

Device side: a block of query rows (:func:`_load_q`), a split's tiles (:func:`_split_tiles`), a
tile's fp32 scores (:func:`_score`). Host side: ``INTERPRETED``, the SM count and the splits.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux-only dependency; the reference still works without it
    triton = tl = None

# Most candidates per row the split-merge kernel holds (splits * next_pow2(topk)).
MAX_CANDIDATES = 4096

# True when triton.jit gave interpreted functions (TRITON_INTERPRET=1 was set before triton was
# imported): the kernels then run on CPU tensors; otherwise they run compiled on CUDA tensors.
INTERPRETED = False

if triton is not None:

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

    INTERPRETED = type(_score).__name__ == "InterpretedFunction"


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


_SM_COUNT: dict[int, int] = {}


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
