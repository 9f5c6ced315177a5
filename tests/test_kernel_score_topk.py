"""score_topk: the torch reference against a dense top-k, the Triton kernel against the reference.

The kernel runs in the Triton interpreter on CPU (set below, before triton is first imported) and
compiled on a GPU. Run this file in its own process: triton decides interpreted-or-compiled when the
kernel module is imported, so an earlier import elsewhere in the same process decides for us.
On a GPU machine the default is compiled (the ``gpu`` tests); ``TRITON_INTERPRET=1`` forces the
interpreter there too.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

kmod = importlib.import_module("dist_reattn.kernels.score_topk")
score_topk, score_topk_ref = kmod.score_topk, kmod.score_topk_ref

needs_interpreter = pytest.mark.skipif(
    not (kmod.triton is not None and kmod.INTERPRETED),
    reason="kernel module was imported without TRITON_INTERPRET=1 (compiled mode or no triton); "
    "run this test file in its own process on a CPU machine",
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or kmod.triton is None or kmod.INTERPRETED,
    reason="needs a CUDA GPU and compiled triton (TRITON_INTERPRET unset)",
)


def dense_topk(q, k, start, end, topk):
    """Definition by brute force: full fp32 score matrix, stable sort (ties keep lower index)."""
    c, H, d = q.shape
    g = H // k.shape[1]
    kr = k[start:end].float().repeat_interleave(g, dim=1)  # [n, H, d]
    s = torch.einsum("chd,nhd->chn", q.float(), kr)  # [c, H, n]
    v, i = s.sort(dim=-1, descending=True, stable=True)
    v, i = v[..., :topk], i[..., :topk] + start
    pad = topk - v.shape[-1]
    if pad > 0:
        v = torch.cat([v, v.new_full((c, H, pad), float("-inf"))], -1)
        i = torch.cat([i, i.new_full((c, H, pad), -1)], -1)
    return v, i


def make(c, H, Hkv, d, N, dtype, ties, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        # Small integers: every score is an exact integer in fp32 whatever the summation order, and
        # many scores tie exactly, so the lower-index rule decides the order.
        q = torch.randint(-2, 3, (c, H, d), generator=gen).to(dtype)
        k = torch.randint(-1, 2, (N, Hkv, d), generator=gen).to(dtype)
        if N > 8:
            k[N // 2 : N // 2 + 4] = k[3]  # repeated keys: identical scores, different indices
    else:
        q = torch.randn(c, H, d, generator=gen).to(dtype)
        k = torch.randn(N, Hkv, d, generator=gen).to(dtype)
    return q.to(device), k.to(device)


# (c, H, Hkv, d, N, start, end, topk)
REF_CASES = [
    (5, 9, 3, 64, 1000, 0, 1000, 8),  # SmolLM2 grouping
    (1, 8, 2, 128, 333, 17, 300, 4),  # decode, start > 0, ragged
    (3, 4, 4, 64, 9, 1, 6, 16),  # topk > keys: padding
    (2, 8, 2, 64, 50, 20, 20, 3),  # empty range: all padding
    (4, 9, 3, 64, 257, 0, 257, 1),
    (2, 8, 2, 64, 700, 3, 699, 32),
]


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("case", REF_CASES)
def test_ref_matches_dense(case, ties):
    c, H, Hkv, d, N, start, end, topk = case
    q, k = make(c, H, Hkv, d, N, torch.float32, ties, seed=sum(case))
    v, i = score_topk_ref(q, k, start, end, topk, block=37)  # many blocks: ties cross block edges
    dv, di = dense_topk(q, k, start, end, topk)
    assert v.shape == i.shape == (c, H, topk) and v.dtype == torch.float32 and i.dtype == torch.int64
    if ties:  # exact integers: same values, and the same indices in the same order
        assert torch.equal(v, dv) and torch.equal(i, di)
    else:  # only the fp32 summation order differs between bmm and einsum
        torch.testing.assert_close(v, dv, rtol=1e-5, atol=1e-4)
        assert torch.equal(i.sort(-1).values, di.sort(-1).values)


def _assert_same(v, i, rv, ri, exact=True):
    assert v.shape == rv.shape and i.shape == ri.shape
    assert v.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, ri), f"indices differ at {(i != ri).nonzero()[:5].tolist()}"
    if exact:  # integer-valued scores are exact in fp32 whatever the summation order
        assert torch.equal(v, rv)
    else:  # fp16 products are exact in fp32; only the order of the fp32 sums differs
        torch.testing.assert_close(v, rv, rtol=1e-6, atol=1e-5)


INTERP_CASES = [
    (3, 9, 3, 64, 300, 5, 290, 8, None),  # 9/3 heads, ragged tail, start > 0
    (1, 8, 2, 64, 200, 0, 200, 4, None),  # decode, 8/2 heads
    (2, 4, 2, 64, 10, 2, 9, 16, None),  # fewer keys than topk: padding
    (2, 8, 2, 128, 150, 0, 150, 32, 3),  # d = 128, topk 32, uneven splits
    (7, 9, 3, 64, 130, 1, 129, 1, 5),  # topk 1, more row blocks, splits of one tile
    (2, 8, 2, 64, 40, 40, 40, 4, None),  # empty range
]


# One-pass kernel with each merge, and the two-pass path (topk <= 4: larger topks run at 4 there).
VARIANTS = {
    "one-pass MERGE 0": {"TWO_PASS": False, "MERGE": 0},
    "one-pass MERGE 1": {"TWO_PASS": False, "MERGE": 1},
    "two-pass": {"TWO_PASS": True},
}


@needs_interpreter
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("case", INTERP_CASES + [(9, 9, 3, 64, 700, 3, 690, 4, 3)])
def test_kernel_interpreter_matches_ref(case, ties, variant):
    # Integer ties put several entries above a row's threshold in one tile (the rounds path runs)
    # and make many tile maxima equal (the two-pass path must then keep the earliest tiles).
    c, H, Hkv, d, N, start, end, topk, splits = case
    if VARIANTS[variant]["TWO_PASS"]:
        topk = min(topk, 4)
    q, k = make(c, H, Hkv, d, N, torch.float16, ties, seed=sum(case[:-1]))
    v, i = score_topk(q, k, start, end, topk, splits=splits, config=VARIANTS[variant])
    rv, ri = score_topk_ref(q, k, start, end, topk)
    _assert_same(v, i, rv, ri, exact=ties)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_interpreter_dtypes_and_strides(dtype):
    # q as a strided view (heads of a wider tensor), as the engine's gathered q may be.
    c, H, Hkv, d, N = 2, 8, 2, 64, 100
    q_all, k = make(c, 2 * H, Hkv, d, N, dtype, ties=False, seed=3)
    q = q_all[:, H:]
    assert not q.is_contiguous()
    v, i = score_topk(q, k, 4, 97, 6)
    rv, ri = score_topk_ref(q, k, 4, 97, 6)
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv, rtol=1e-6, atol=1e-5)  # fp32 sums in another order


@needs_interpreter
def test_launcher_rejects_bad_inputs():
    q, k = make(1, 8, 2, 64, 50, torch.float16, False, seed=1)
    assert kmod.supports("cpu") and not kmod.supports("cuda")
    with pytest.raises(AssertionError):
        score_topk(q, k.float(), 0, 50, 4)  # dtype mismatch
    with pytest.raises(AssertionError):
        score_topk(q[:, :7], k, 0, 50, 4)  # 7 heads over 2 KV heads
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 51, 4)  # end > N
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 50, kmod.MAX_TOPK + 1)
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 50, 4, config={"ONE_INSERT": True})  # v2's key, gone in v3
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 50, 5, config={"TWO_PASS": True})  # keeps four tile maxima per row
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 50, 4, config={"TWO_PASS": True, "SCORE_ONLY": True})


@pytest.mark.skipif(
    kmod.triton is None or not (kmod.INTERPRETED or torch.cuda.is_available()), reason="needs triton"
)
@pytest.mark.parametrize("n_cand,topk", [(4, 4), (8, 4), (12, 3), (28, 4), (64, 1), (8, 2)])
def test_plan_lists_each_rows_best_tiles(n_cand, topk):
    # The step between the two passes, against its definition: per row the topk best candidates
    # by (tile max descending, tile ascending), tau the last of their maxima; per block of rows the
    # union of those tiles, ascending. Small integer maxima: many ties, decided by the tile.
    dev = "cpu" if kmod.INTERPRETED else "cuda"
    Hkv, rows_pad, bm = 2, 64, 16
    gen = torch.Generator().manual_seed(n_cand)
    a = torch.randint(0, 4, (Hkv, rows_pad, n_cand), generator=gen).float()
    a[0, 3, 1:] = float("-inf")  # a row with fewer listed tiles than topk
    t = torch.stack([torch.randperm(100, generator=gen)[:n_cand] for _ in range(Hkv * rows_pad)])
    t = t.view(Hkv, rows_pad, n_cand).int()
    t[0, 3, 1:] = kmod.NO_TILE
    pad = max(2, kmod._next_pow2(topk))
    n_blocks = rows_pad // bm
    tau = torch.empty(Hkv, rows_pad, device=dev)
    ids = torch.empty(Hkv, n_blocks, bm * pad, dtype=torch.int32, device=dev)
    count = torch.empty(Hkv, n_blocks, dtype=torch.int32, device=dev)
    kmod._plan_kernel[(n_blocks, Hkv)](
        a.to(dev), t.to(dev), tau, ids, count, n_cand, rows_pad, n_blocks,
        TOPK=topk, TOPK_PAD=pad, BLOCK_M=bm, CAND_PAD=kmod._next_pow2(n_cand), num_warps=1,
    )  # fmt: skip
    order = (a * 1000 - t.float()).sort(dim=-1, descending=True).indices[..., :topk]
    want_t, want_a = t.gather(-1, order), a.gather(-1, order)
    assert torch.equal(tau.cpu(), want_a[..., -1])
    for h in range(Hkv):
        for b in range(n_blocks):
            tiles = want_t[h, b * bm : (b + 1) * bm].unique()
            tiles = tiles[tiles != kmod.NO_TILE].int()
            assert count[h, b].item() == len(tiles)
            assert torch.equal(ids[h, b, : len(tiles)].cpu(), tiles)


def _check_gpu(q, k, start, end, topk):
    v, i = score_topk(q, k, start, end, topk)
    rv, ri = score_topk_ref(q, k, start, end, topk)  # fp32 from the same bf16/fp16 values
    c, H, d = q.shape
    g = H // k.shape[1]
    # The products of bf16/fp16 values are exact in fp32; only the order of the fp32 sums differs
    # (tensor-core tiles vs bmm), so a score is off by at most about d * 2^-24 * sum_j |q_j k_j|.
    qa, ka = q.float().abs(), k[start:end].float().abs()
    tol = 4 * d * 2.0**-24 * (qa.amax() * ka.amax() * d).item()
    assert v.shape == (c, H, topk) and i.dtype == torch.int64
    assert torch.isfinite(v).all() and (i >= start).all() and (i < end).all()
    assert (v[..., :-1] >= v[..., 1:]).all()  # sorted
    assert (i.sort(-1).values.diff(dim=-1) != 0).all()  # no index twice
    # Each returned index's true score (recomputed in fp64) is the returned value, within tol.
    kh = torch.arange(H, device=q.device) // g
    kt = k.double()[i, kh[None, :, None]]  # [c, H, topk, d]
    true = torch.einsum("chd,chtd->cht", q.double(), kt)
    torch.testing.assert_close(v.double(), true, rtol=0, atol=tol)
    torch.testing.assert_close(v, rv, rtol=0, atol=tol)
    # Index sets agree, except for keys within tol of the k-th score (their order is rounding).
    kth = rv[..., -1:]
    sure = rv > kth + tol
    hit = (ri[..., :, None] == i[..., None, :]).any(-1)
    assert hit[sure].all(), f"missed {(~hit & sure).sum().item()} clear winners"
    return (hit.float().mean().item(), tol)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("c,N", [(1, 300_001), (512, 70_001), (1, 4099), (512, 262_144 + 513)])
def test_kernel_gpu_matches_ref(dtype, shape, c, N):
    H, Hkv, d = shape
    q, k = make(c, H, Hkv, d, N, dtype, ties=False, seed=c + N, device="cuda")
    _check_gpu(q, k, 7, N - 3, 16)
    _check_gpu(q, k, 0, N, 1)
    _check_gpu(q, k, 5, N, 4)  # two-pass at c = 512 (prefill, topk <= 4)


@pytest.mark.gpu
@needs_gpu
def test_kernel_gpu_ties():
    # Integer-valued bf16: every score exact, many exact ties: must equal the reference exactly.
    q, k = make(64, 8, 2, 128, 50_000, torch.bfloat16, ties=True, seed=5, device="cuda")
    for topk, cfg in ((1, None), (4, None), (4, {"TWO_PASS": False}), (8, None), (32, None)):
        v, i = score_topk(q, k, 3, 49_990, topk, config=cfg)
        rv, ri = score_topk_ref(q, k, 3, 49_990, topk)
        _assert_same(v, i, rv, ri)
