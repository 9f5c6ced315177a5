"""Approximate score + top-k: tiles chosen on the FP8 tensor cores, the chosen tiles rescored exactly.

Shapes and row packing as in :mod:`.common`: ``q`` [c, H, d], ``k`` [N, Hkv, d] (bf16/fp16, what the
exact path scores), ``k8`` [N, Hkv, d] the same keys in e4m3 (``torch.float8_e4m3fn``), ``scale``
[Hkv, d] fp32 one power of two per (KV head, channel), ``g * c`` GQA-packed rows per KV head. Tile
``t`` of a row holds keys ``[start + t * FP8_TILE, start + (t + 1) * FP8_TILE) & [start, end)``.

What is computed (:func:`~.ref.score_topk_fp8_ref` is the definition):

1. ``k8 = e4m3((k - mu) / scale)`` (:func:`quantize_keys`; ``mu`` the keys' per-channel centre,
   :func:`key_center`, or 0), ``q8 = e4m3(q * scale / r)`` with one power of two ``r`` per row
   (:func:`fold_query`): ``q8 . k8 = (q * scale) . ((k - mu) / scale) / r``, roughly
   ``(q . k - q . mu) / r``; a shift and a positive factor per row change no ranking within the row.
2. Per row, each tile's maximum of ``q8 . k8`` (pass 1, :func:`_fp8_tile_max_kernel`: FP8 dot,
   fp32 accumulate); the row's ``keep = topk + margin`` best tiles by that maximum, ties to the lower
   tile (:func:`~.two_pass._plan_kernel`).
3. The exact top-k (bf16/fp16 scores, as :func:`~.score_topk.score_topk`) over the keys of the row's
   own chosen tiles only (:func:`~.two_pass._revisit_kernel`, ``FILTER`` 3). Scores returned are
   exact scores of the keys returned; with ``keep`` >= the row's tile count the result is
   :func:`~.ref.score_topk_ref`'s.

Only step 2 is approximate, and only in which tiles it picks: a key whose tile is not chosen is
missed. Unlike the exact two-pass path there is no bound ``tau`` and no proof; ``margin`` buys
tiles. The kernel's fp32 (on Hopper: the tensor cores' reduced-precision) accumulation of ``q8 .
k8`` may order two tiles whose exact FP8 maxima lie within its rounding apart unlike the reference,
which sums the FP8 products exactly (tests/test_kernel_fp8.py checks the choice up to that).

The pass-1 tile (``FP8_TILE`` keys) is part of the definition, the same in the interpreter and
compiled. FP8 tensor cores need compute capability 8.9 (Ada) or later: :func:`check_fp8` refuses
older GPUs with one line naming the GPU; on CPU (no interpreter) callers run the reference.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED, _default_splits, _next_pow2, _sm_count, _split, tl, triton
from .score_topk import _DTYPES
from .two_pass import NO_TILE, _plan, _second_pass

E4M3_MAX = 448.0
# Keys per pass-1 tile: the unit of choice (part of the definition, kernel and reference alike).
FP8_TILE = 64
# Headroom of the key scale (a power of two): the keys the scale is computed from reach at most
# E4M3_MAX / KEY_HEADROOM, so later keys up to twice as large still quantize without saturating.
KEY_HEADROOM = 2.0
# Most tiles a row keeps (topk + margin): the plan step's repeat test is quadratic in 16 * keep.
MAX_KEEP = 16
# Oldest GPU with FP8 tensor cores (Ada; Hopper is 9.0).
FP8_CAPABILITY = (8, 9)
_QUANT_ROWS = 1 << 16  # keys per chunk when quantizing: bounds the fp32 temporaries


def _pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """The least power of two ``>= x`` elementwise (fp32, ``x >= 0``; 1 where ``x`` is 0)."""
    m, e = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(m), e - (m == 0.5).to(e.dtype))


def key_center(k: torch.Tensor) -> torch.Tensor:
    """Per-(KV head, channel) mean of the keys ``k`` [N, Hkv, d]: ``[Hkv, d]`` fp32.

    The FP8 keys are the keys minus this centre (:func:`quantize_keys`). For one query row ``q``
    (one KV head's), ``q . (k - mu) = q . k - q . mu`` moves every score of the row by the same
    amount, so no ranking within the row changes, tiles included; but the FP8 rounding error of a
    product scales with its magnitude, and real keys carry large per-channel offsets shared by
    every token (the outlier channels of LLM keys, which SageAttention's smoothing of K removes the
    same way). Centred, the rounding is relative to what varies between keys, not to the offset.
    """
    assert k.dim() == 3, k.shape
    total = torch.zeros(k.shape[1:], dtype=torch.float32, device=k.device)
    for b0 in range(0, k.shape[0], _QUANT_ROWS):
        total += k[b0 : b0 + _QUANT_ROWS].float().sum(0)
    return total / max(k.shape[0], 1)


def key_scale(
    k: torch.Tensor, headroom: float = KEY_HEADROOM, center: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-(KV head, channel) scale of the keys ``k`` [N, Hkv, d] (minus ``center`` [Hkv, d], if
    given: :func:`key_center`): ``[Hkv, d]`` fp32 powers of two.

    The least power of two with ``amax * headroom / scale <= E4M3_MAX``, ``amax`` the channel's
    largest ``|k|`` over these keys: they land in ``(E4M3_MAX / (2 headroom), E4M3_MAX / headroom]``.
    A power of two makes ``k / scale`` and ``q * scale`` exact, so quantizing rounds only mantissas.
    Keys appended later with ``|k| > E4M3_MAX * scale`` saturate at ``+-E4M3_MAX`` (see
    :func:`quantize_keys`): that can only change which tiles pass 1 picks, never the scores
    returned, which are the exact rescoring. A channel that is zero in every key gets its head's
    largest scale (1 if the head is all zero).
    """
    assert k.dim() == 3 and headroom >= 1, (k.shape, headroom)
    amax = torch.zeros(k.shape[1:], dtype=torch.float32, device=k.device)  # [Hkv, d]
    mu = 0.0 if center is None else center.float()
    for b0 in range(0, k.shape[0], _QUANT_ROWS):
        amax = torch.maximum(amax, (k[b0 : b0 + _QUANT_ROWS].float() - mu).abs().amax(0))
    amax = torch.where(amax > 0, amax, amax.amax(-1, keepdim=True))
    return _pow2_at_least(amax * headroom / E4M3_MAX)


def quantize_keys(
    k: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, center: torch.Tensor | None = None
) -> torch.Tensor:
    """``e4m3((k - center) / scale)``, saturating at ``+-E4M3_MAX``.

    Args:
        k: ``[N, Hkv, d]`` keys, any float dtype.
        scale: ``[Hkv, d]`` fp32 (:func:`key_scale`, of the same centre), on ``k``'s device.
        out: optional ``[N, Hkv, d]`` float8_e4m3fn destination (e.g. a slice of a cache).
        center: optional ``[Hkv, d]`` fp32 (:func:`key_center`); None: 0.

    Returns:
        ``[N, Hkv, d]`` ``torch.float8_e4m3fn`` (``out`` if given), round to nearest even.
    """
    assert k.dim() == 3 and scale.shape == k.shape[1:], (k.shape, scale.shape)
    if out is None:
        out = torch.empty(k.shape, dtype=torch.float8_e4m3fn, device=k.device)
    assert out.shape == k.shape and out.dtype == torch.float8_e4m3fn, (out.shape, out.dtype)
    inv = 1.0 / scale.float()  # exact: powers of two
    mu = 0.0 if center is None else center.float()
    for b0 in range(0, k.shape[0], _QUANT_ROWS):  # chunks: 4M keys x 8 heads x 128 in fp32 is 16 GiB
        b1 = min(b0 + _QUANT_ROWS, k.shape[0])
        # clamp first: e4m3fn has no inf, and an out-of-range conversion gives NaN
        out[b0:b1] = ((k[b0:b1].float() - mu) * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return out


def fold_query(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Queries folded with the key scale and rounded to e4m3, one power of two per row dropped.

    ``q8[i, h] = e4m3(q[i, h] * scale[h // g] / r[i, h])``, ``r`` the least power of two putting the
    row's largest ``|q * scale|`` at or below ``E4M3_MAX`` (in ``(E4M3_MAX / 2, E4M3_MAX]``; 1 for a
    zero row). ``q8 . k8`` is then about ``q . k / r``: ``r > 0`` scales a whole row and changes no
    ranking within it, so it is not kept.

    Args:
        q: ``[c, H, d]`` queries, any float dtype.
        scale: ``[Hkv, d]`` fp32 key scale (:func:`key_scale`), ``H % Hkv == 0``.

    Returns:
        ``[c, H, d]`` ``torch.float8_e4m3fn``, contiguous.
    """
    c, H, d = q.shape
    Hkv = scale.shape[0]
    assert scale.shape == (Hkv, d) and H % Hkv == 0, (q.shape, scale.shape)
    qs = q.float() * scale.float().repeat_interleave(H // Hkv, dim=0)  # [c, H, d], head h -> h // g
    r = _pow2_at_least(qs.abs().amax(-1, keepdim=True) / E4M3_MAX)  # [c, H, 1]
    return (qs / r).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


def check_fp8(device: torch.device | str) -> None:
    """Raises ``RuntimeError`` (one line, naming the GPU) where ``device`` is a CUDA GPU without
    FP8 tensor cores (compute capability below 8.9). Any other device passes."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    if tuple(cap) < FP8_CAPABILITY:
        raise RuntimeError(
            f"FP8 scoring needs FP8 tensor cores (compute capability >= {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}); "
            f"cuda:{idx} is {torch.cuda.get_device_name(idx)}, compute capability {cap[0]}.{cap[1]}"
        )


def supports_fp8(device: torch.device | str) -> bool:
    """Whether :func:`score_topk_fp8` runs on tensors of ``device`` in this process: compiled on a
    CUDA GPU of compute capability >= 8.9, or in the interpreter on CPU. Callers fall back to
    :func:`~.ref.score_topk_fp8_ref` elsewhere (CPU); on an older GPU :func:`check_fp8` says why."""
    dev = torch.device(device)
    if triton is None or dev.type != ("cpu" if INTERPRETED else "cuda"):
        return False
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return tuple(torch.cuda.get_device_capability(idx)) >= FP8_CAPABILITY
    return True


if triton is not None:
    from .common import _load_q, _score, _split_tiles
    from .merge import _empty_lists, _insert

    @triton.jit
    def _keep_tile(m, tile, best_a, best_t, thr, worst_t, BLOCK_M: tl.constexpr, GATE: tl.constexpr):
        """Puts each row's tile max ``m`` [BLOCK_M] (tile ``tile``, later than every tile kept) into
        the row's unsorted list of its best tile maxima ``best_a``/``best_t`` [BLOCK_M, KEEP_PAD]
        (:func:`~.merge._insert`: into the worst slot, where ``m`` beats the row's worst ``thr``; an
        equal maximum keeps the earlier tile). ``GATE`` 1 skips the insertion when no row of the
        block gains (a block-wide test per tile); 0 always runs it."""
        need = m > thr
        tiles = tl.full([BLOCK_M], 0, tl.int32) + tile
        if GATE:
            if tl.max(need.to(tl.int32), axis=0) > 0:
                best_a, best_t, thr, worst_t = _insert(best_a, best_t, thr, worst_t, m, tiles, need)
        else:
            best_a, best_t, thr, worst_t = _insert(best_a, best_t, thr, worst_t, m, tiles, need)
        return best_a, best_t, thr, worst_t

    @triton.jit
    def _fp8_tile_max_kernel(
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
        # strides (the candidate buffers are contiguous [Hkv, rows_pad, splits * KEEP_PAD])
        stride_qc,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_ch,
        stride_cr,
        # meta
        HEAD_DIM: tl.constexpr,
        KEEP: tl.constexpr,
        KEEP_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr,
        GATE: tl.constexpr,
        PIPE: tl.constexpr,
        FLOOR: tl.constexpr,
    ):
        """Pass 1: per row, the ``KEEP`` largest tile maxima of ``q8 . k8`` in one split and their
        tiles, into ``cand_*[kvh, row, split * KEEP_PAD:]`` (unsorted; -inf / NO_TILE past what the
        row has). ``q8`` [c, H, d] and ``k8`` [N, Hkv, d] are e4m3: ``tl.dot`` on the FP8 tensor
        cores, fp32 accumulate. The key tile is loaded [HEAD_DIM, BLOCK_N] with HEAD_DIM contiguous
        (each key's channels), i.e. the B operand K-major, as FP8 wgmma wants it. ``UPCAST``
        (interpreter): the dot in fp32 on the same (exactly representable) values. ``PIPE`` 1 issues
        tile ``t + 1``'s dot before tile ``t``'s maximum and list update (the same results; whether
        the compiler then overlaps them is what a benchmark measures); 0 scores and keeps in turn.
        ``FLOOR`` 1 (a benchmark baseline, WRONG results by design) keeps only each row's running
        maximum over its whole tiles, no list: the dot and one compare per score, what the list
        update costs on top."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        kvh = tl.program_id(2)
        rows, row_ok, tok, head, q = _load_q(
            q_ptr, pid_m, kvh, n_rows, group, stride_qc, stride_qh, HEAD_DIM, BLOCK_M, UPCAST
        )
        best_a, best_t, thr, worst_t = _empty_lists(row_ok, KEEP, KEEP_PAD, BLOCK_M)
        lo, hi, n_full, offs_n, k_tile = _split_tiles(
            k_ptr, kvh, pid_s, start, end, split_len, stride_kn, stride_kh, HEAD_DIM, BLOCK_N
        )
        tile0 = pid_s * (split_len // BLOCK_N)
        if FLOOR:
            run = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for _t in range(0, n_full):
                run = tl.maximum(run, tl.max(_score(q, tl.load(k_tile), UPCAST, False), axis=1))
                k_tile += BLOCK_N * stride_kn
            best_a, best_t, thr, worst_t = _keep_tile(run, tile0, best_a, best_t, thr, worst_t, BLOCK_M, 0)
        elif PIPE:
            if n_full > 0:
                s = _score(q, tl.load(k_tile), UPCAST, False)  # [BLOCK_M, BLOCK_N] fp32
                for t in range(1, n_full):
                    k_tile += BLOCK_N * stride_kn
                    s_next = _score(q, tl.load(k_tile), UPCAST, False)
                    best_a, best_t, thr, worst_t = _keep_tile(
                        tl.max(s, axis=1), tile0 + t - 1, best_a, best_t, thr, worst_t, BLOCK_M, GATE
                    )
                    s = s_next
                best_a, best_t, thr, worst_t = _keep_tile(
                    tl.max(s, axis=1), tile0 + n_full - 1, best_a, best_t, thr, worst_t, BLOCK_M, GATE
                )
                k_tile += BLOCK_N * stride_kn
        else:
            for t in range(0, n_full):
                s = _score(q, tl.load(k_tile), UPCAST, False)  # [BLOCK_M, BLOCK_N] fp32
                best_a, best_t, thr, worst_t = _keep_tile(
                    tl.max(s, axis=1), tile0 + t, best_a, best_t, thr, worst_t, BLOCK_M, GATE
                )
                k_tile += BLOCK_N * stride_kn
        tail = lo + n_full * BLOCK_N
        if tail < hi:  # ragged last tile, masked
            col_ok = tail + offs_n < hi
            s = _score(q, tl.load(k_tile, mask=col_ok[None, :], other=0.0), UPCAST, False)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            best_a, best_t, thr, worst_t = _keep_tile(
                tl.max(s, axis=1), tile0 + n_full, best_a, best_t, thr, worst_t, BLOCK_M, GATE
            )

        # Every row of the grid is written; slots past KEEP, empty slots and padding rows hold
        # (-inf, NO_TILE), which the plan step never picks ahead of a real tile.
        slots = tl.arange(0, KEEP_PAD)
        real = row_ok[:, None] & (slots[None, :] < KEEP) & (best_t >= 0)
        off = kvh * stride_ch + rows.to(tl.int64)[:, None] * stride_cr + pid_s * KEEP_PAD + slots[None, :]
        tl.store(cand_a_ptr + off, tl.where(real, best_a, float("-inf")))
        tl.store(cand_t_ptr + off, tl.where(real, best_t, 2147483647))  # NO_TILE


def fp8_config(n_rows: int, head_dim: int) -> dict:
    """Launch config of the FP8 path by the rows one KV head serves (``g * c``). ``BLOCK_N`` is
    ``FP8_TILE`` in both passes (the definition's tile); pass 2 is the exact path's (16 rows)."""
    if INTERPRETED:  # every program costs ~ms there: small row blocks
        return {"BLOCK_M": max(16, min(32, _next_pow2(n_rows))), "BLOCK_N": FP8_TILE, "num_warps": 4,
                "num_stages": 1, "GATE": 0, "BLOCK_M2": 16, "num_warps2": 1, "num_stages2": 1}  # fmt: skip
    # Not tuned on a GPU yet. Chosen offline (triton.compile for sm_90, cuobjdump -res-usage, triton
    # 3.9): 128 rows spill nothing (208 registers at 8 warps, d = 128; at 4 warps, d = 64) where 256
    # rows spill (a 224-320 byte stack); pass 2 over keep-long pick lists spills at 1 warp, d = 128
    # (255 registers + 152 bytes), not at 2 (200).
    return {"BLOCK_M": min(128, max(16, _next_pow2(n_rows))), "BLOCK_N": FP8_TILE,
            "num_warps": 8 if head_dim >= 128 else 4, "num_stages": 3, "GATE": 0, "BLOCK_M2": 16,
            "num_warps2": 2, "num_stages2": 3}  # fmt: skip


def _check_fp8_inputs(q, k, k8, scale, start, end, topk, margin) -> None:
    """Asserts what :func:`score_topk_fp8` takes (after :func:`check_fp8` has refused an old GPU)."""
    assert triton is not None, "score_topk_fp8 needs triton; use score_topk_fp8_ref"
    assert q.dim() == 3 and k.dim() == 3, f"q [c, H, d] and k [N, Hkv, d], got {q.shape}, {k.shape}"
    c, H, d = q.shape
    N, Hkv, dk = k.shape
    assert dk == d and Hkv >= 1 and H % Hkv == 0, f"heads/dims mismatch: q {q.shape}, k {k.shape}"
    assert c >= 1 and 32 <= d <= 256 and d & (d - 1) == 0, (
        f"need c >= 1, power-of-two head_dim in [32, 256]: {q.shape}"
    )
    assert q.dtype == k.dtype and q.dtype in _DTYPES, (q.dtype, k.dtype)
    assert k8.shape == k.shape and k8.dtype == torch.float8_e4m3fn, f"k8 {k8.shape} {k8.dtype}, k {k.shape}"
    assert scale.shape == (Hkv, d) and scale.dtype == torch.float32, f"scale {scale.shape} {scale.dtype}"
    assert q.device == k.device == k8.device == scale.device, (q.device, k.device, k8.device, scale.device)
    where = "cpu (TRITON_INTERPRET=1)" if INTERPRETED else "cuda"
    assert supports_fp8(q.device), f"score_topk_fp8 runs on {where} tensors in this process, got {q.device}"
    assert q.stride(2) == 1 and k.stride(2) == 1 and k8.stride(2) == 1, (
        "last dim of q, k, k8 must be contiguous"
    )
    assert k8.stride(0) == k8.shape[1] * d and k8.stride(1) == d, "k8 must be contiguous"
    assert not isinstance(end, torch.Tensor), "score_topk_fp8 takes a host end row (prefill)"
    assert 0 <= start <= end <= N < 2**31, (start, end, N)
    assert topk >= 1 and margin >= 0 and topk + margin <= MAX_KEEP, (
        f"need topk >= 1, margin >= 0, topk + margin <= {MAX_KEEP}: topk {topk}, margin {margin}"
    )


def score_topk_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    k8: torch.Tensor,
    scale: torch.Tensor,
    start: int,
    end: int,
    topk: int,
    margin: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton FP8-chosen score + top-k; same results as :func:`~.ref.score_topk_fp8_ref` (up to the
    order of tiles whose FP8 maxima tie within the accumulation's rounding).

    Args:
        q: ``[c, H, d]`` un-rotated queries, fp16/bf16 (fp32 too), last dim contiguous.
        k: ``[N, Hkv, d]`` keys, q's dtype and device, last dim contiguous (the exact rescoring).
        k8: ``[N, Hkv, d]`` ``torch.float8_e4m3fn`` keys, contiguous (:func:`quantize_keys`).
        scale: ``[Hkv, d]`` fp32 scale ``k8`` was made with (:func:`key_scale`).
        start, end: key rows ``[start, end)``, host ints, ``0 <= start <= end <= N``.
        topk: keys kept per (token, head), ``>= 1``.
        margin: extra tiles kept per row beyond ``topk`` (``topk + margin <= MAX_KEEP``).

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64, as :func:`~.score_topk.score_topk`:
        exact scores of the keys picked, sorted descending, ties to the lower index, ``-inf`` / -1
        padding.

    Raises:
        RuntimeError: on a CUDA GPU without FP8 tensor cores (:func:`check_fp8`).
    """
    if not INTERPRETED:
        check_fp8(q.device)
    _check_fp8_inputs(q, k, k8, scale, start, end, topk, margin)
    c, H, d = q.shape
    cfg = fp8_config(H // k.shape[1] * c, d)
    v, i, _ = _fp8_two_pass(q, k, k8, scale, start, end, topk, margin, None, cfg)
    return v, i


def _fp8_two_pass(q, k, k8, scale, start, end, topk, margin, splits, cfg):
    """Pass 1 and the plan (:func:`_fp8_first_pass`), then the exact rescoring of each row's own
    chosen tiles: sorted ``[c, H, topk]`` scores and indices, and the plan."""
    plan = _fp8_first_pass(fold_query(q, scale), k8, start, end, topk + margin, splits, cfg)
    v, i = _second_pass(q, k, start, end, topk, {**cfg, "FILTER": 3, "MERGE": 0}, plan)
    return v, i, plan


def _fp8_first_pass(q8, k8, start, end, keep, splits, cfg):
    """Pass 1 over ``q8`` [c, H, d] and ``k8`` [N, Hkv, d] (e4m3), then the plan: ``(tau, picks,
    ids, count)`` as :func:`~.two_pass._plan` (``picks`` [Hkv, rows_pad, keep_pad] int32: row ``r``
    = token ``r // g``, head ``kvh * g + r % g``; its ``keep`` tiles by FP8 max descending, then
    tile ascending, then NO_TILE)."""
    c, H, d = q8.shape
    Hkv = k8.shape[1]
    g = H // Hkv
    n_rows, n_keys = g * c, end - start
    block_m, block_n, block_m2 = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_M2"]
    assert block_n == FP8_TILE, f"the FP8 path's tile is {FP8_TILE} keys (the definition), got {block_n}"
    assert block_m % block_m2 == 0, f"BLOCK_M {block_m} must be a multiple of BLOCK_M2 {block_m2}"
    keep_pad = max(2, _next_pow2(keep))
    row_blocks = triton.cdiv(n_rows, block_m)
    rows_pad = row_blocks * block_m
    if splits is None:
        splits = _default_splits(n_keys, row_blocks * Hkv, block_n, keep_pad, _sm_count(q8.device))
    splits, split_len = _split(n_keys, splits, block_n)

    cand_a = torch.empty((Hkv, rows_pad, splits * keep_pad), dtype=torch.float32, device=q8.device)
    cand_t = torch.empty((Hkv, rows_pad, splits * keep_pad), dtype=torch.int32, device=q8.device)
    _fp8_tile_max_kernel[(row_blocks, splits, Hkv)](
        q8, k8, cand_a, cand_t,
        n_rows, g, start, end, split_len,
        q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1), cand_a.stride(0), cand_a.stride(1),
        HEAD_DIM=d, KEEP=keep, KEEP_PAD=keep_pad, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=INTERPRETED,
        GATE=cfg.get("GATE", 0), PIPE=cfg.get("PIPE", 0), FLOOR=cfg.get("FLOOR", 0),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return _plan(cand_a, cand_t, keep, block_m2)


def fp8_picks(picks: torch.Tensor, c: int, H: int, keep: int) -> torch.Tensor:
    """The plan's ``picks`` [Hkv, rows_pad, keep_pad] as ``[c, H, keep]`` int64 tiles (-1 for none),
    the layout of :func:`~.ref.fp8_tile_choice`."""
    Hkv = picks.shape[0]
    g = H // Hkv
    p = picks[:, : g * c, :keep].long()  # [Hkv, g*c, keep], row = token * g + head-in-group
    p = torch.where(p == NO_TILE, -1, p)
    return p.reshape(Hkv, c, g, keep).permute(1, 0, 2, 3).reshape(c, H, keep)
