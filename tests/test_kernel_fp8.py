"""score_topk_fp8: the quantizers and the reference, and the Triton kernel against the reference.

Like tests/test_kernel_score_topk.py: the kernel runs in the Triton interpreter on CPU (set below,
before triton is first imported) and compiled on a GPU with FP8 tensor cores (compute capability
>= 8.9; ``device`` ``cuda`` in the ids), where the ``gpu`` tests add large N. Run this file in its
own process.

How the kernel is held to the reference. Everything but one step is exact and shared: ``q8`` and
``k8`` come from the same :func:`fold_query` / :func:`quantize_keys`, pass 2 is the exact path's
merge. The one step that is not: the kernel sums the FP8 products in fp32 (on Hopper: the tensor
cores' reduced-precision accumulation) in its own order, while the reference sums them exactly
(fp64 holds every such sum: :func:`~dist_reattn.kernels.ref.fp8_tile_maxima`). So two tiles whose
exact FP8 maxima lie within ``2E`` (``E`` a bound on the kernel's error) may come out in either
order. The checks, per row (:func:`check_choice`, :func:`check_result`):

* the tiles the kernel chose (it returns them: ``return_picks``) are ``min(keep, tiles)`` distinct
  real tiles, and no tile left out beats a chosen one by more than ``2E`` in exact FP8 maxima; on
  integer-valued data (every sum exact in any order) they are exactly the reference's;
* the result is the exact top-k over the keys of the tiles the kernel chose (:func:`topk_in_tiles`),
  exactly on integer data, else up to the rounding of the bf16/fp16 scores as in the exact kernel's
  tests; where the choice equals the reference's, that is :func:`score_topk_fp8_ref`.

``E``: interpreter (numpy fp32 matmul) ``(d + 1) 2^-24 sum_i |q8_i k8_i|`` (products of e4m3 values
are exact in fp32; Higham's bound for the sum). GPU: ``2^-8 sum_i |q8_i k8_i|``, an assumption:
FP8 tensor cores do not accumulate in IEEE fp32 (DeepSeek-V3 reports about 14 bits kept on H800);
2^-8 is far above that, and only widens the band of ties a row may break either way.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402
from test_kernel_score_topk import assert_equal_topk, rounding_bound  # noqa: E402

from dist_reattn.kernels import (  # noqa: E402
    check_fp8,
    common,
    fold_query,
    fp8,
    key_center,
    key_scale,
    quantize_keys,
    ref,
    score_topk_fp8,
    score_topk_fp8_ref,
    score_topk_ref,
    supports_fp8,
)
from dist_reattn.kernels._variants import score_topk_fp8_variant  # noqa: E402

DEVICE = "cpu" if common.INTERPRETED else "cuda"
needs_kernel = pytest.mark.skipif(
    common.triton is None or not (common.INTERPRETED or (torch.cuda.is_available() and supports_fp8("cuda"))),
    reason="needs triton: TRITON_INTERPRET=1 on CPU (set by this file), or compiled on a GPU with FP8 "
    "tensor cores (compute capability >= 8.9)",
)
# In the interpreter the launcher upcasts pass 2's operands (tl.dot on bf16 is wrong there).
DTYPES = [torch.float16, torch.float32] if common.INTERPRETED else [torch.float16, torch.bfloat16]
TILE = fp8.FP8_TILE
ACC = (2.0**-24, True) if common.INTERPRETED else (2.0**-8, False)  # (unit, times d + 1?)


def make(c, H, Hkv, d, N, dtype, kind, seed, device="cpu"):
    """``(q, k, k8, scale)``. ``kind``: ``random`` (normal), ``ties`` (small integers: every score,
    exact or FP8, exact in fp32 in any order, and many equal), ``outlier`` (normal, with a few key
    channels 50x larger, and queries with one large channel)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        q = torch.randint(-2, 3, (c, H, d), generator=gen).float()
        k = torch.randint(-1, 2, (N, Hkv, d), generator=gen).float()
        if N > 8:
            k[N // 2 : N // 2 + 4] = k[3]  # repeated keys: identical scores, different indices
    else:
        q = torch.randn(c, H, d, generator=gen)
        k = torch.randn(N, Hkv, d, generator=gen)
        if kind == "outlier":
            k[..., :3] *= 50
            q[..., 5] *= 20
    q, k = q.to(dtype).to(device), k.to(dtype).to(device)
    scale = key_scale(k)
    return q, k, quantize_keys(k, scale), scale


def accumulation_bound(q, k8, scale):
    """``E`` [c, H] fp64: a bound on the kernel's error in any FP8 score of a row (module docstring)."""
    c, H, d = q.shape
    g = H // k8.shape[1]
    q8 = fold_query(q, scale).double().abs()  # [c, H, d]
    kmax = k8.double().abs().amax(0).repeat_interleave(g, dim=0)  # [H, d]
    unit, per_term = ACC
    return (q8 * kmax).sum(-1) * unit * ((d + 1) if per_term else 1)


def check_choice(q, k8, scale, start, end, keep, picks, exact):
    """The kernel's tiles ``picks`` [c, H, keep] against the exact FP8 tile maxima."""
    maxima = ref.fp8_tile_maxima(q, k8, scale, start, end)  # [c, H, T] fp64, exact
    T = maxima.shape[-1]
    want = ref.fp8_tile_choice(maxima, keep)
    assert picks.shape == want.shape and picks.dtype == torch.int64, (picks.shape, want.shape)
    n = min(keep, T)
    assert (picks[..., n:] == -1).all() and (picks[..., :n] >= 0).all() and (picks[..., :n] < T).all()
    assert (picks[..., :n].sort(-1).values.diff(dim=-1) != 0).all(), "a tile twice"
    if exact:
        assert torch.equal(picks, want), f"choice differs at {(picks != want).any(-1).nonzero()[:5].tolist()}"
        return
    if n == T:
        return  # every tile chosen
    chosen = torch.zeros_like(maxima, dtype=torch.bool).scatter_(-1, picks[..., :n], True)
    low = maxima.masked_fill(~chosen, float("inf")).amin(-1)  # weakest chosen
    high = maxima.masked_fill(chosen, float("-inf")).amax(-1)  # strongest left out
    e = accumulation_bound(q, k8, scale)
    bad = low < high - 2 * e
    assert not bad.any(), f"a tile left out beats a chosen one by > 2E at {bad.nonzero()[:5].tolist()}"


def check_result(q, k, start, end, topk, tiles, v, i, exact):
    """``(v, i)`` against the exact top-k over the keys of ``tiles`` [c, H, m]: exactly (integer
    data) or up to rounding, as the exact kernel's ``_check``: no -1 where the row's tiles hold keys,
    each score its key's own, scores within ``tol`` of the reference's, and its indices wherever its
    scores stand more than ``tol`` apart."""
    c, H, d = q.shape
    assert v.shape == i.shape == (c, H, topk) and v.dtype == torch.float32 and i.dtype == torch.int64
    rv, ri = ref.topk_in_tiles(q, k, start, end, topk + 1, tiles)  # one more: the gap below the k-th
    real = ri[..., :topk] >= 0
    assert torch.equal(i >= 0, real), "padding where the reference has keys, or keys where it has none"
    assert (v[~real] == float("-inf")).all() and ((i[real] >= start) & (i[real] < end)).all()
    if exact:
        assert_equal_topk(v, i, rv, ri, topk)
        return
    e = rounding_bound(q, k, start, end)
    tol = 16 * e
    g = H // k.shape[1]
    kh = (torch.arange(H, device=q.device) // g)[None, :, None].expand(c, H, topk)
    true = torch.einsum("chd,chtd->cht", q.double(), k.double()[i.clamp_min(0), kh])
    torch.testing.assert_close(v[real].double(), true[real], rtol=0, atol=2 * e)  # the key's own score
    torch.testing.assert_close(v[real], rv[..., :topk][real], rtol=0, atol=tol)
    assert (v[..., :-1] >= v[..., 1:]).all(), "not sorted"
    gap = rv[..., :-1] - rv[..., 1:]  # [c, H, topk]: below each place; inf above padding
    gap = torch.where(rv[..., 1:] == float("-inf"), float("inf"), gap)
    sure = gap > tol
    sure[..., 1:] &= gap[..., :-1] > tol
    sure &= real
    assert torch.equal(i[sure], ri[..., :topk][sure]), (
        f"indices differ where the reference's scores are {tol:.2e} apart: "
        f"{((i != ri[..., :topk]) & sure).nonzero()[:5].tolist()}"
    )


def run_and_check(q, k, k8, scale, start, end, topk, margin, exact, splits=None, config=None):
    """The kernel (with its picks) against the reference; also the public launcher, which must give
    the same. Returns ``(v, i, picks)``."""
    v, i, picks = score_topk_fp8_variant(
        q, k, k8, scale, start, end, topk, margin, splits=splits, config=config, return_picks=True
    )
    check_choice(q, k8, scale, start, end, topk + margin, picks, exact)
    check_result(q, k, start, end, topk, picks, v, i, exact)
    if exact:  # the reference's choice, so the reference's result, ties and all
        rv, ri = score_topk_fp8_ref(q, k, k8, scale, start, end, topk, margin)
        assert torch.equal(i, ri) and torch.equal(v, rv)
    if splits is None and config is None:
        pv, pi = score_topk_fp8(q, k, k8, scale, start, end, topk, margin)
        assert torch.equal(pi, i) and torch.equal(pv, v)
    return v, i, picks


# ---- quantizers and the reference (pure torch) ----


def test_key_scale_and_quantize_keys():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(500, 3, 64, generator=gen) * torch.logspace(-3, 3, 64)  # channels over 6 decades
    k[:, 1, 7] = 0  # a zero channel
    scale = key_scale(k)
    assert scale.shape == (3, 64) and scale.dtype == torch.float32
    m, _ = torch.frexp(scale)
    assert (m == 0.5).all(), "scales are powers of two"
    amax = k.abs().amax(0)
    nz = amax > 0
    ratio = amax[nz] / scale[nz]  # in (448 / 4, 448 / 2]: headroom 2
    assert (ratio > fp8.E4M3_MAX / 4).all() and (ratio <= fp8.E4M3_MAX / 2).all()
    assert scale[1, 7] == scale[1].max()  # a zero channel takes its head's largest scale
    k8 = quantize_keys(k, scale)
    assert k8.dtype == torch.float8_e4m3fn and k8.shape == k.shape
    back = k8.float() * scale
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), subnormals step 2^-9 of the scale
    assert ((back - k).abs() <= 2.0**-4 * k.abs() + 2.0**-10 * scale).all()
    # keys beyond the scale's range saturate, never NaN: only the tile choice can change
    big = quantize_keys(k * 4, scale)
    assert not big.float().isnan().any() and big.float().abs().max() == fp8.E4M3_MAX
    # chunks: the same bits
    old = fp8._QUANT_ROWS
    try:
        fp8._QUANT_ROWS = 64
        assert torch.equal(quantize_keys(k, scale).view(torch.uint8), k8.view(torch.uint8))
        assert torch.equal(key_scale(k), scale)
    finally:
        fp8._QUANT_ROWS = old


def test_centred_keys_rank_what_a_shared_offset_hides():
    # Real keys carry per-channel offsets shared by every token (outlier channels). q . k then holds
    # a large term q . mu, the same for every key of a row, whose FP8 rounding error swamps what
    # tells the keys apart; the keys minus their centre (key_center) leave the ranking as it was
    # (a shift per row) and round only what varies. The first keys' centre, as the cache takes it.
    gen = torch.Generator().manual_seed(3)
    c, H, Hkv, d, N, topk = 16, 4, 2, 64, 2048, 4
    offset = torch.zeros(Hkv, d)
    offset[:, :8] = 30 * torch.randn(Hkv, 8, generator=gen).sign()
    k = offset + torch.randn(N, Hkv, d, generator=gen)
    q = torch.randn(c, H, d, generator=gen)
    q[..., :8] += 2  # queries that read the offset channels too
    want = score_topk_ref(q, k, 0, N, topk)[1].sort(-1).values
    equal = {}
    for name, center in [("plain", None), ("centred", key_center(k[:512]))]:
        scale = key_scale(k[:512], center=center)
        k8 = quantize_keys(k, scale, center=center)
        got = score_topk_fp8_ref(q, k, k8, scale, 0, N, topk, margin=2)[1].sort(-1).values
        equal[name] = (got == want).all(-1).float().mean().item()
        every = score_topk_fp8_ref(q, k, k8, scale, 0, 16 * TILE, topk, margin=16 - topk)
        assert_equal_topk(*every, *score_topk_ref(q, k, 0, 16 * TILE, topk), topk)  # every tile: exact
    assert equal["centred"] >= 0.95 and equal["plain"] <= equal["centred"] - 0.3, equal


def test_fold_query():
    gen = torch.Generator().manual_seed(1)
    c, H, Hkv, d = 4, 6, 2, 64
    q = torch.randn(c, H, d, generator=gen)
    q[1, 2] = 0  # a zero row
    k = torch.randn(300, Hkv, d, generator=gen) * torch.logspace(-1, 1, d)
    scale = key_scale(k)
    q8 = fold_query(q, scale)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == q.shape
    qs = q * scale.repeat_interleave(H // Hkv, dim=0)  # [c, H, d]
    top = q8.float().abs().amax(-1)
    # (224, 448] before rounding
    assert ((top >= fp8.E4M3_MAX / 2) | (top == 0)).all() and (top <= fp8.E4M3_MAX).all()
    assert (q8[1, 2].float() == 0).all()
    # a row's factor r is the least power of two with max |qs| / r <= 448: q8 * r is qs rounded
    amax = qs.abs().amax(-1, keepdim=True)
    r = torch.where(amax > 0, 2.0 ** torch.ceil(torch.log2(amax.double() / fp8.E4M3_MAX)), 1.0).float()
    assert ((q8.float() * r - qs).abs() <= 2.0**-4 * qs.abs() + 2.0**-10 * r).all()
    # q8 . k8 is q . k / r up to the roundings: the ranking within a row survives on random data
    k8 = quantize_keys(k, scale)
    s8 = torch.einsum("chd,nhd->chn", q8.float(), k8.float().repeat_interleave(H // Hkv, dim=1)) * r
    s = torch.einsum("chd,nhd->chn", q, k.repeat_interleave(H // Hkv, dim=1))
    rows = q.abs().sum(-1) > 0
    corr = torch.stack(
        [torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(s8[rows], s[rows], strict=True)]
    )
    assert corr.min() > 0.99, corr.min()


def test_ref_sums_fp8_exactly():
    # fp8_tile_maxima sums in fp64, exact in any order: reversing the channels gives the same bits,
    # which fp32 sums of the same products do not (the kernel's).
    q, k, k8, scale = make(3, 4, 2, 128, 256, torch.float32, "outlier", seed=2)
    m = ref.fp8_tile_maxima(q, k8, scale, 0, 256)
    k8r = k8.view(torch.uint8).flip(-1).view(torch.float8_e4m3fn)  # no flip for fp8 itself
    mr = ref.fp8_tile_maxima(q.flip(-1), k8r, scale.flip(-1), 0, 256)
    assert m.shape == (3, 4, 4) and torch.equal(m, mr)
    q8 = fold_query(q, scale).float()
    g = 2
    s32 = torch.einsum("chd,nhd->chn", q8, k8.float().repeat_interleave(g, dim=1))
    s32r = torch.einsum("chd,nhd->chn", q8.flip(-1), k8r.float().repeat_interleave(g, dim=1))
    assert not torch.equal(s32, s32r)  # the data is one where the order matters in fp32


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize(
    "case", [(3, 9, 3, 64, 300, 5, 290, 4), (2, 8, 2, 128, 200, 0, 200, 1), (2, 4, 2, 64, 10, 2, 9, 8)]
)
def test_ref_all_tiles_is_exact(case, kind):
    # keep >= the row's tiles: score_topk_ref, bit for bit (and ties by index)
    c, H, Hkv, d, N, start, end, topk = case
    q, k, k8, scale = make(c, H, Hkv, d, N, torch.float32, kind, seed=sum(case))
    margin = -(-(end - start) // TILE)
    rv, ri = score_topk_fp8_ref(q, k, k8, scale, start, end, topk, margin)
    ev, ei = score_topk_ref(q, k, start, end, topk)
    assert torch.equal(rv, ev) and torch.equal(ri, ei)


def fp8_flip(c, H, Hkv, d, N, start, dtype, device):
    """Integer data where FP8 rounding hides the best key: queries in {1, 2}, every key in {-1, 0,
    1} except ``best`` (all ones; tile 0) and ``better`` = ``best`` + 2^-6 in channel 0 (tile 3),
    which e4m3 rounds back to ``best`` (128 + 2 -> 128 at a step of 16, scale 2^-7). Their FP8 tile
    maxima tie exactly; the earlier tile wins. Every sum is exact in any order."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(1, 3, (c, H, d), generator=gen).float()
    k = torch.randint(-1, 2, (N, Hkv, d), generator=gen).float()
    best, better = start + 1, start + 3 * TILE + 5
    k[best] = 1.0
    k[better] = 1.0
    k[better, :, 0] += 2.0**-6
    q, k = q.to(dtype).to(device), k.to(dtype).to(device)
    scale = key_scale(k)
    return q, k, quantize_keys(k, scale), scale, best, better


def test_ref_margin_recovers_what_fp8_hides():
    c, H, Hkv, d, N, start = 2, 4, 2, 64, 400, 7
    q, k, k8, scale, best, better = fp8_flip(c, H, Hkv, d, N, start, torch.float32, "cpu")
    assert torch.equal(k8[best].view(torch.uint8), k8[better].view(torch.uint8))
    _, ei = score_topk_ref(q, k, start, N, 1)
    assert (ei == better).all()
    _, i0 = score_topk_fp8_ref(q, k, k8, scale, start, N, 1, 0)
    assert (i0 == best).all()  # one tile kept: the earlier of the two tied ones
    _, i1 = score_topk_fp8_ref(q, k, k8, scale, start, N, 1, 1)
    assert (i1 == better).all()


# ---- the kernel against the reference ----

# (c, H, Hkv, d, N, start, end, topk, margin, splits)
CASES = [
    (3, 9, 3, 64, 300, 5, 290, 4, 2, None),  # 9/3 heads, ragged tail, start > 0
    (2, 8, 2, 128, 260, 0, 260, 1, 3, 2),  # d = 128, two splits, a 4-key last tile
    (7, 9, 3, 64, 200, 1, 199, 2, 0, 3),  # margin 0, three splits of one tile
    (20, 4, 1, 64, 150, 0, 150, 3, 1, None),  # 80 rows of one KV head: several row blocks
    (2, 4, 2, 64, 10, 2, 9, 4, 1, None),  # fewer keys than topk: one tile, padding
    (2, 8, 2, 64, 40, 40, 40, 4, 2, None),  # empty range
]


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("kind", ["random", "ties", "outlier"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_kernel_matches_ref(case, kind, device):
    c, H, Hkv, d, N, start, end, topk, margin, splits = case
    q, k, k8, scale = make(c, H, Hkv, d, N, torch.float16, kind, seed=sum(case[:-1]), device=device)
    run_and_check(q, k, k8, scale, start, end, topk, margin, exact=kind == "ties", splits=splits)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_kernel_all_tiles_is_exact(kind, dtype, device):
    # A margin covering every tile: the exact top-k (score_topk_ref), ties by index on integer data.
    c, H, Hkv, d, N, start, end, topk = 3, 9, 3, 64, 700, 3, 690, 4
    q, k, k8, scale = make(c, H, Hkv, d, N, dtype, kind, seed=3, device=device)
    margin = fp8.MAX_KEEP - topk  # 16 tiles >= 11
    v, i = score_topk_fp8(q, k, k8, scale, start, end, topk, margin)
    all_tiles = torch.arange(-(-(end - start) // TILE), device=device).expand(c, H, -1)
    check_result(q, k, start, end, topk, all_tiles, v, i, exact=kind == "ties")
    ev, ei = score_topk_ref(q, k, start, end, topk)
    if kind == "ties":
        assert torch.equal(i, ei) and torch.equal(v, ev)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
def test_kernel_margin_recovers_what_fp8_hides(device):
    c, H, Hkv, d, N, start = 2, 4, 2, 64, 400, 7
    q, k, k8, scale, best, better = fp8_flip(c, H, Hkv, d, N, start, torch.float16, device)
    v0, i0, _ = run_and_check(q, k, k8, scale, start, N, 1, 0, exact=True)
    assert (i0 == best).all()  # as the reference: the hidden key's tile loses the tie
    v1, i1, _ = run_and_check(q, k, k8, scale, start, N, 1, 1, exact=True)
    assert (i1 == better).all()
    ev, _ = score_topk_ref(q, k, start, N, 1)
    assert torch.equal(v1, ev)


def fp8_near_ties(c, H, Hkv, d, N, start, end, dtype, seed, device):
    """Tile maxima that tie exactly in FP8 but not in the kernel's fp32 sums. Queries and random
    keys repeat each coordinate twice; one base key per KV head, copied into every tile with random
    pairs of coordinates swapped (both orders of every pair occur): paired channels share their
    scale, so q8 repeats its pairs and the copies' FP8 products are one multiset, summed in other
    orders. The first half of the pairs is large in both q and the base key (the base key beats
    every random key there and sets the scale); the second half small in both, where random keys set
    the scale, so those products are fine (~2^-10) against sums near 2^20 (fp32 ulp 2^-3): the fp32
    sums round, each order its own way. Every row's best tiles are all of the copies' tiles."""
    gen = torch.Generator().manual_seed(seed)
    big = (torch.arange(d // 2) < d // 4)[None, :, None]  # [1, d/2, 1]
    q = torch.where(big[..., 0], 1.0, 1e-3) * (torch.rand(c, H, d // 2, generator=gen) + 0.5)
    q = q.repeat_interleave(2, dim=-1)
    k = (torch.randn(N, Hkv, d // 2, generator=gen) * 0.5).repeat_interleave(2, dim=-1)
    base = torch.where(big, 3.0, 0.01) * (torch.rand(Hkv, d // 2, 2, generator=gen) + 0.7)
    for n, j in enumerate(range(start + 1, end, TILE // 2)):
        swap = (
            torch.rand(Hkv, d // 2, 1, generator=gen) < 0.5 if n > 1 else torch.full((Hkv, d // 2, 1), n == 1)
        )
        k[j] = torch.where(swap, base.flip(-1), base).reshape(Hkv, d)
    q, k = q.to(dtype).to(device), k.to(dtype).to(device)
    scale = key_scale(k)
    return q, k, quantize_keys(k, scale), scale


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("topk, margin", [(1, 0), (2, 1), (4, 2)])
def test_kernel_fp8_near_ties(topk, margin, device):
    c, H, Hkv, d, N, start, end = 6, 4, 1, 64, 500, 5, 490
    q, k, k8, scale = fp8_near_ties(c, H, Hkv, d, N, start, end, torch.float16, seed=topk, device=device)
    maxima = ref.fp8_tile_maxima(q, k8, scale, start, end)
    assert (maxima == maxima.amax(-1, keepdim=True)).all()  # every tile ties, exactly, in FP8
    # ... while fp32 sums of the same products (in CPU einsum's order) do not, in some row: the data
    # is built so. (On a GPU, cuBLAS may sum in an order where they happen to tie: checked on CPU.)
    copies = torch.arange(start + 1, end, TILE // 2)
    s32 = torch.einsum("chd,nd->chn", fold_query(q, scale).float().cpu(), k8[copies, 0].float().cpu())
    assert (s32 != s32[..., :1]).any()
    run_and_check(q, k, k8, scale, start, end, topk, margin, exact=False)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("topk, margin", [(1, 0), (1, 2), (4, 1)])
def test_kernel_equal_tile_maxima(topk, margin, splits, device):
    # Integer data with the same strongest key (all ones, queries in {1, 2}) at a random spot of
    # every tile: every tile's FP8 maximum ties exactly, and the earliest tiles must be kept, in
    # every split and across splits.
    c, H, Hkv, d, N, start, end = 5, 4, 2, 64, 600, 3, 590
    gen = torch.Generator().manual_seed(topk + margin)
    q, k, _, _ = make(c, H, Hkv, d, N, torch.float16, "ties", seed=11)
    q = q.abs().clamp_min(1)
    for t0 in range(start, end, TILE):
        k[min(end - 1, t0 + int(torch.randint(0, TILE, (1,), generator=gen)))] = 1.0
    q, k = q.to(device), k.to(device)
    scale = key_scale(k)
    k8 = quantize_keys(k, scale)
    maxima = ref.fp8_tile_maxima(q, k8, scale, start, end)
    assert (maxima == maxima.amax(-1, keepdim=True)).all()
    _, _, picks = run_and_check(q, k, k8, scale, start, end, topk, margin, exact=True, splits=splits)
    assert (picks == torch.arange(topk + margin, device=device)).all()


@needs_kernel
def test_floor_baseline_only_when_asked():
    """``FLOOR`` (pass 1 without its tile list: a benchmark floor) returns wrong results by design,
    so the variant entry point refuses it unless told ``inexact``; told, it runs."""
    q, k, k8, scale = make(4, 4, 2, 64, 300, torch.float16, "random", seed=3, device=DEVICE)
    with pytest.raises(AssertionError, match="wrong results"):
        score_topk_fp8_variant(q, k, k8, scale, 0, 300, 2, 1, config={"FLOOR": 1})
    v, i = score_topk_fp8_variant(q, k, k8, scale, 0, 300, 2, 1, config={"FLOOR": 1}, inexact=True)
    assert v.shape == i.shape == (4, 4, 2)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize(
    "config", [{"GATE": 1}, {"PIPE": 1}, {"BLOCK_M": 16, "BLOCK_M2": 16}, {"BLOCK_M": 64, "BLOCK_M2": 32}]
)
def test_kernel_configs(config, device):
    c, H, Hkv, d, N, start, end, topk, margin = 9, 9, 3, 64, 330, 3, 320, 3, 2
    for kind in ("ties", "random"):
        q, k, k8, scale = make(c, H, Hkv, d, N, torch.float16, kind, seed=9, device=device)
        run_and_check(q, k, k8, scale, start, end, topk, margin, exact=kind == "ties", config=config)


def test_old_gpu_refused_with_one_line(monkeypatch):
    # No such GPU here: the capability and name are faked (only this message test does that).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError) as err:
        check_fp8("cuda")
    msg = str(err.value)
    assert "\n" not in msg and "NVIDIA A100-SXM4-80GB" in msg and "8.0" in msg and "8.9" in msg, msg
    check_fp8("cpu")  # CPU passes: the reference or the interpreter runs it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (9, 0))
    check_fp8("cuda:0")
    if not common.INTERPRETED:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (8, 6))
        q, k, k8, scale = make(1, 4, 2, 64, 100, torch.float16, "random", seed=1, device="cuda")
        with pytest.raises(RuntimeError, match="compute capability 8.6"):
            score_topk_fp8(q, k, k8, scale, 0, 100, 4, 2)


@needs_kernel
def test_launcher_rejects_bad_inputs():
    q, k, k8, scale = make(1, 8, 2, 64, 100, torch.float16, "random", seed=1, device=DEVICE)
    assert supports_fp8(DEVICE) and not supports_fp8("cuda" if DEVICE == "cpu" else "cpu")
    bad = [
        (q, k, k8.float(), scale, 0, 100, 4, 2),  # k8 not e4m3
        (q, k, k8, scale[:1], 0, 100, 4, 2),  # scale of another head count
        (q, k, k8, scale.double(), 0, 100, 4, 2),
        (q, k.float(), k8, scale, 0, 100, 4, 2),  # dtype mismatch
        (q, k, k8[:50], scale, 0, 100, 4, 2),
        (q, k, k8, scale, 0, 101, 4, 2),  # end > N
        (q, k, k8, scale, 0, torch.tensor([100]), 4, 2),  # a device end: prefill only
        (q, k, k8, scale, 0, 100, 4, fp8.MAX_KEEP - 3),  # keep > MAX_KEEP
        (q, k, k8, scale, 0, 100, 0, 2),
        (
            q[..., :16].contiguous(),
            k[..., :16].contiguous(),
            k8[..., :16].contiguous(),
            scale[:, :16],
            0,
            100,
            4,
            2,
        ),
    ]
    for args in bad:
        with pytest.raises(AssertionError):
            score_topk_fp8(*args)


# ---- large N, compiled ----


@pytest.mark.gpu
@needs_kernel
@pytest.mark.skipif(common.INTERPRETED, reason="compiled only")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("c,N", [(512, 70_001), (256, 262_144 + 513)])
def test_kernel_gpu_matches_ref(dtype, shape, c, N):
    H, Hkv, d = shape
    q, k, k8, scale = make(c, H, Hkv, d, N, dtype, "random", seed=c + N, device="cuda")
    for start, topk, margin in ((5, 4, 4), (0, 1, 0), (7, 8, 8)):
        v, i, picks = run_and_check(q, k, k8, scale, start, N - 3, topk, margin, exact=False)
    # top-k agreement with the exact path on random keys, topk 4: the reference says ~99% at
    # margin 4 (32K keys); a broken choice would be near 0
    ev, ei = score_topk_ref(q, k, 0, N, 4)
    _, i4 = score_topk_fp8(q, k, k8, scale, 0, N, 4, 4)
    agree = (i4.sort(-1).values == ei.sort(-1).values).all(-1).float().mean().item()
    assert agree > 0.9, agree


@pytest.mark.gpu
@needs_kernel
@pytest.mark.skipif(common.INTERPRETED, reason="compiled only")
def test_kernel_gpu_ties():
    # Integer-valued bf16: every sum exact on the tensor cores too: the reference's choice exactly.
    q, k, k8, scale = make(64, 8, 2, 128, 50_000, torch.bfloat16, "ties", seed=5, device="cuda")
    for topk, margin in ((1, 0), (4, 4), (4, 12)):
        run_and_check(q, k, k8, scale, 3, 49_990, topk, margin, exact=True)
