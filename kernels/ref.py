"""The pure-torch reference: the exact score + top-k that the Triton kernels must compute.

For every query head ``h`` and query token ``i``, over the keys ``j`` in ``[start, end)``:
``s[i, h, j] = q[i, h] . k[j, h // g]`` (no 1/sqrt(d) scale, no softmax; ``q`` [c, H, d], ``k``
[N, Hkv, d], ``g = H // Hkv``), and the ``topk`` largest scores with their key indices, ``[c, H,
topk]``. Ties go to the lower key index; results are ordered by score descending, then index
ascending. Where fewer than ``topk`` keys exist, the tail is padded with score ``-inf`` and index
``-1``. The ``[c, N]`` score matrix is never materialized: the reference walks the keys in blocks
and keeps a running top-k (:func:`~.merge.sort_topk`).

:func:`score_topk_fp8_ref` defines the approximate FP8 path (:mod:`.fp8`): each row's best tiles by
FP8 tile maximum (:func:`fp8_tile_maxima`, :func:`fp8_tile_choice`), then the exact top-k over the
keys of those tiles only (:func:`topk_in_tiles`).
"""

from __future__ import annotations

import torch

from .fp8 import FP8_TILE, fold_query
from .merge import sort_topk

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


def _rows(q: torch.Tensor, Hkv: int, dtype=torch.float32) -> torch.Tensor:
    """``q`` [c, H, d] as ``[Hkv, g*c, d]`` in ``dtype``: row ``gi * c + i`` for token ``i``, head
    ``kvh * g + gi`` (the reference's packing, not the kernels')."""
    c, H, d = q.shape
    g = H // Hkv
    return q.to(dtype).reshape(c, Hkv, g, d).permute(1, 2, 0, 3).reshape(Hkv, g * c, d)


def _unrows(x: torch.Tensor, c: int, H: int) -> torch.Tensor:
    """``[Hkv, g*c, m]`` (packed as :func:`_rows`) back to ``[c, H, m]``, contiguous."""
    Hkv, _, m = x.shape
    return x.reshape(Hkv, H // Hkv, c, m).permute(2, 0, 1, 3).reshape(c, H, m).contiguous()


def _exact_block(qf: torch.Tensor, k: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """fp32 scores ``[Hkv, g*c, b1 - b0]`` of rows ``qf`` [Hkv, g*c, d] against keys ``k[b0:b1]``,
    a key's score independent of the block (REF_COLUMNS)."""
    kb = k[b0:b1].float().contiguous()  # [B, Hkv, d]
    pad = -(b1 - b0) % REF_COLUMNS  # zero keys, and every block in the same memory layout
    kb = torch.nn.functional.pad(kb, (0, 0, 0, 0, 0, pad)) if pad else kb
    return torch.bmm(qf, kb.permute(1, 2, 0))[..., : b1 - b0]  # [Hkv, g*c, B]


def _running_topk(qf, k, start, end, topk, block, allowed=None):
    """Exact top-k of rows ``qf`` [Hkv, g*c, d] over keys ``[start, end)`` in blocks of ``block``;
    ``allowed(b0, b1)`` (optional) gives the ``[Hkv, g*c, b1 - b0]`` keys a row may take. Returns
    ``[Hkv, g*c, topk]`` fp32 scores and int64 indices (-inf / -1 padding)."""
    Hkv, R, _ = qf.shape
    best_s = qf.new_full((Hkv, R, topk), float("-inf"))
    best_i = torch.full((Hkv, R, topk), -1, dtype=torch.int64, device=qf.device)
    for b0 in range(start, end, block):
        b1 = min(b0 + block, end)
        s = _exact_block(qf, k, b0, b1)
        if allowed is not None:
            s = s.masked_fill(~allowed(b0, b1), float("-inf"))
        vs, ix = _block_topk(s, min(topk, b1 - b0))
        ix = ix + b0
        if allowed is not None:  # a key left out is padding, not a key at -inf
            ix = torch.where(vs == float("-inf"), -1, ix)
        best_s, best_i = sort_topk(torch.cat([best_s, vs], -1), torch.cat([best_i, ix], -1), topk)
    return best_s, best_i


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
    end = int(end)  # a one-element tensor too (the kernel's device end; here it waits for the device)
    assert H % Hkv == 0 and k.shape[2] == d and 0 <= start <= end <= k.shape[0] and topk >= 1
    best_s, best_i = _running_topk(_rows(q, Hkv), k, start, end, topk, block)
    return _unrows(best_s, c, H), _unrows(best_i, c, H)


def fp8_tile_maxima(
    q: torch.Tensor, k8: torch.Tensor, scale: torch.Tensor, start: int, end: int, block_n: int = FP8_TILE
) -> torch.Tensor:
    """Each row's FP8 tile maxima: ``[c, H, T]`` fp64, ``T = ceil((end - start) / block_n)``.

    Tile ``t`` holds keys ``[start + t * block_n, start + (t + 1) * block_n)`` below ``end``; its
    maximum is ``max_j q8 . k8[j]`` with ``q8 = fold_query(q, scale)``, summed EXACTLY: a product of
    two e4m3 values is a multiple of 2^-18 (the square of the smallest subnormal) below 2^18, so a
    sum of d <= 256 of them is a multiple of 2^-18 below 2^26, 44 bits, which fp64 holds in any
    summation order. (fp32 would not: the kernel's fp32 or tensor-core sums round.)
    """
    c, H, d = q.shape
    Hkv = k8.shape[1]
    assert k8.dtype == torch.float8_e4m3fn and k8.shape[2] == d and d <= 256, (k8.dtype, k8.shape)
    assert 0 <= start <= end <= k8.shape[0] and block_n >= 1, (start, end, block_n)
    qf = _rows(fold_query(q, scale), Hkv, torch.float64)  # [Hkv, g*c, d]
    step = block_n * max(1, REF_BLOCK // block_n)
    maxima = []
    for b0 in range(start, end, step):
        b1 = min(b0 + step, end)
        s = torch.bmm(qf, k8[b0:b1].double().permute(1, 2, 0))  # [Hkv, g*c, B], exact
        s = torch.nn.functional.pad(s, (0, -(b1 - b0) % block_n), value=float("-inf"))
        maxima.append(s.unflatten(-1, (-1, block_n)).amax(-1))  # [Hkv, g*c, B / block_n]
    m = torch.cat(maxima, -1) if maxima else qf.new_empty((Hkv, qf.shape[1], 0))
    return _unrows(m, c, H)


def fp8_tile_choice(maxima: torch.Tensor, keep: int) -> torch.Tensor:
    """Each row's ``keep`` best tiles by FP8 maximum (``maxima`` [c, H, T], :func:`fp8_tile_maxima`),
    maximum descending, then tile ascending: ``[c, H, keep]`` int64, -1 where the row has fewer."""
    order = maxima.sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    pad = keep - order.shape[-1]
    return torch.nn.functional.pad(order, (0, pad), value=-1) if pad > 0 else order


def topk_in_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    end: int,
    topk: int,
    tiles: torch.Tensor,
    block_n: int = FP8_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row over only the keys of its ``tiles`` [c, H, m] (-1 entries ignored),
    tile ``t`` = keys ``[start + t * block_n, start + (t + 1) * block_n) & [start, end)``. Scores and
    ties as :func:`score_topk_ref` (a key scores the same bits there); ``[c, H, topk]``."""
    c, H, d = q.shape
    Hkv = k.shape[1]
    assert tiles.shape[:2] == (c, H), (tiles.shape, q.shape)
    rows_tiles = _rows(tiles, Hkv, torch.int64)  # [Hkv, g*c, m]

    def allowed(b0, b1):
        tile_of = (torch.arange(b0, b1, device=q.device) - start) // block_n  # [B]
        return (tile_of[None, None, :, None] == rows_tiles[:, :, None, :]).any(-1)  # [Hkv, g*c, B]

    step = block_n * max(1, REF_BLOCK // block_n)
    best_s, best_i = _running_topk(_rows(q, Hkv), k, start, end, topk, step, allowed)
    return _unrows(best_s, c, H), _unrows(best_i, c, H)


def score_topk_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    k8: torch.Tensor,
    scale: torch.Tensor,
    start: int,
    end: int,
    topk: int,
    margin: int,
    block_n: int = FP8_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch definition of :func:`~.fp8.score_topk_fp8` (any device).

    Per row: the FP8 maximum of every tile of ``block_n`` keys (:func:`fp8_tile_maxima`, exact
    sums), the ``topk + margin`` best tiles (max descending, then tile ascending:
    :func:`fp8_tile_choice`), and the exact top-k over the keys of those tiles only
    (:func:`topk_in_tiles`). Where ``topk + margin`` covers all of a row's tiles this is
    :func:`score_topk_ref`, bit for bit.

    Args:
        q: ``[c, H, d]`` queries; k: ``[N, Hkv, d]`` keys (exact scores, fp32 from k's values);
        k8: ``[N, Hkv, d]`` float8_e4m3fn keys and scale: ``[Hkv, d]`` (:func:`~.fp8.quantize_keys`);
        start, end: key rows ``[start, end)``; topk, margin: as :func:`~.fp8.score_topk_fp8`;
        block_n: the tile (the kernel's is ``FP8_TILE``).

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64.
    """
    end = int(end)
    assert topk >= 1 and margin >= 0 and k.shape == k8.shape, (topk, margin, k.shape, k8.shape)
    tiles = fp8_tile_choice(fp8_tile_maxima(q, k8, scale, start, end, block_n), topk + margin)
    return topk_in_tiles(q, k, start, end, topk, tiles, block_n)
