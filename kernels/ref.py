"""The pure-torch reference: the exact score + top-k that the Triton kernels must compute.

For every query head ``h`` and query token ``i``, over the keys ``j`` in ``[start, end)``:
``s[i, h, j] = q[i, h] . k[j, h // g]`` (no 1/sqrt(d) scale, no softmax; ``q`` [c, H, d], ``k``
[N, Hkv, d], ``g = H // Hkv``), and the ``topk`` largest scores with their key indices, ``[c, H,
topk]``. Ties go to the lower key index; results are ordered by score descending, then index
ascending. Where fewer than ``topk`` keys exist, the tail is padded with score ``-inf`` and index
``-1``. The ``[c, N]`` score matrix is never materialized: the reference walks the keys in blocks
and keeps a running top-k (:func:`~.merge.sort_topk`).
"""

from __future__ import annotations

import torch

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
