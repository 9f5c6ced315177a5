"""Exact score + top-k of un-rotated queries against one rank's keys: the launcher the engine calls.

For every query head ``h`` and query token ``i``, over the keys ``j`` in ``[start, end)``:
``s[i, h, j] = q[i, h] . k[j, h // group]`` (no 1/sqrt(d) scale, no softmax), and the ``topk``
largest scores with their key indices (``q`` [c, H, d], ``k`` [N, Hkv, d], results [c, H, topk]).
Ties go to the lower key index; results are ordered by score descending, then index ascending.
Where fewer than ``topk`` keys exist, the tail is padded with score ``-inf`` and index ``-1``.

One file per algorithm, the same results:

* ``ref.py``: :func:`score_topk_ref`, the pure-torch definition.
* ``one_pass.py`` (decode, and topk > 4): each program merges every tile into per-row top-k lists.
* ``two_pass.py`` (prefill at topk <= 4): each row's best tile maxima first, then the exact merge
  over just those tiles.
* ``merge.py``: :func:`sort_topk`, the per-row lists in registers and the merge of split lists.
* ``common.py``: the Triton import, the interpreter switch, row blocks, key splits, tile scores.

:func:`score_topk` takes no tuning switch: it runs :func:`default_config`'s path and tiles, which
are exact. Other tiles, paths and split counts, and the benchmarks' inexact baselines, are reached
only through the private ``_variants.py``.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED, _next_pow2, triton
from .one_pass import _one_pass
from .two_pass import _two_pass

# Largest topk the kernel keeps in registers (the list is [BLOCK_M, next_pow2(topk)]).
MAX_TOPK = 32
# Prefill (rows per KV head, g * c) from which topk <= 4 takes the two-pass path by default.
TWO_PASS_MIN_ROWS = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(device: torch.device | str) -> bool:
    """Whether :func:`score_topk` runs on tensors of ``device`` in this process.

    Compiled Triton takes CUDA tensors; the interpreter (``TRITON_INTERPRET=1`` set before triton was
    first imported) takes CPU tensors. Callers fall back to :func:`score_topk_ref` elsewhere.
    """
    if triton is None:
        return False
    return torch.device(device).type == ("cpu" if INTERPRETED else "cuda")


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


def score_topk(
    q: torch.Tensor, k: torch.Tensor, start: int, end: int | torch.Tensor, topk: int
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

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64, as :func:`score_topk_ref`.
    """
    _check_inputs(q, k, start, end, topk)
    c, H, d = q.shape
    two_pass = False if isinstance(end, torch.Tensor) else None
    return _launch(q, k, start, end, topk, None, default_config(H // k.shape[1] * c, d, topk, two_pass))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, start: int, end: int | torch.Tensor, topk: int) -> None:
    """Asserts what :func:`score_topk` takes: shapes, dtypes, devices, strides, the key range, topk."""
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


def _launch(q, k, start, end, topk, splits, cfg):
    """The path ``cfg`` names (``TWO_PASS``), with its tiles and ``splits`` (None: enough to fill the
    GPU): sorted ``[c, H, topk]`` scores and indices."""
    if cfg.get("TWO_PASS"):
        return _two_pass(q, k, start, end, topk, splits, cfg)
    return _one_pass(q, k, start, end, topk, splits, cfg)
