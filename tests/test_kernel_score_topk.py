"""score_topk: the torch reference against a dense top-k, the Triton kernel against the reference.

The kernel runs in the Triton interpreter on CPU (set below, before triton is first imported) and
compiled on a GPU. Run this file in its own process: triton decides interpreted-or-compiled when the
kernel module is imported, so an earlier import elsewhere in the same process decides for us.
On a GPU machine the default is compiled: the kernel cases then run on CUDA tensors (``device``
``cuda`` in their ids; ``cpu`` under the interpreter), and the ``gpu`` tests add large N;
``TRITON_INTERPRET=1`` forces the interpreter there too.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import inspect  # noqa: E402

import pytest  # noqa: E402

from dist_reattn.kernels import MAX_TOPK, common, ref, score_topk, score_topk_ref, supports, two_pass  # noqa: E402
from dist_reattn.kernels._variants import score_topk_variant  # noqa: E402
from dist_reattn.kernels.score_topk import default_config  # noqa: E402

# Where the kernel runs in this process: CPU tensors under the interpreter, CUDA tensors compiled.
DEVICE = "cpu" if common.INTERPRETED else "cuda"
needs_kernel = pytest.mark.skipif(
    common.triton is None or not (common.INTERPRETED or torch.cuda.is_available()),
    reason="needs triton: TRITON_INTERPRET=1 on CPU (set by this file), or compiled on a CUDA GPU",
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or common.triton is None or common.INTERPRETED,
    reason="needs a CUDA GPU and compiled triton (TRITON_INTERPRET unset)",
)
# In the interpreter tl.dot on bf16 is wrong (the launcher upcasts there): fp16 and fp32 (IEEE dot).
# Compiled: fp16 and bf16, the production dtype (fp32 compiled: test_kernel_dtypes_and_strides).
DTYPES = [torch.float16, torch.float32] if common.INTERPRETED else [torch.float16, torch.bfloat16]


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


@pytest.mark.parametrize("c, H, Hkv, d", [(2, 9, 3, 64), (1, 6, 3, 16)])  # SmolLM2-like, a tiny decode
@pytest.mark.parametrize("N, block", [(130, ref.REF_BLOCK), (1000, 37), (4099, ref.REF_BLOCK)])
def test_ref_scores_a_key_the_same_anywhere(N, block, c, H, Hkv, d):
    # Random fp32 keys (rounding depends on the summation order) with copies of one key at the first
    # rows, the middle and the ragged tail: every copy must get the bit-identical score, and every
    # key the same score whether scored over the whole range, a ragged sub-range, or the stripes
    # each of P ranks holds with one-token pages. Otherwise two ranks could break a tie between
    # copies by rounding instead of by index (it did, with MKL on AVX2, before the reference padded
    # its GEMMs: REF_COLUMNS).
    q, k = make(c, H, Hkv, d, N, torch.float32, False, seed=N)
    copies = [0, 1, N // 2, N - 2, N - 1]
    k[copies] = k[N // 3].clone()

    def every_score(keys, lo, hi):  # [c, H, hi - lo], in row order
        v, i = score_topk_ref(q, keys, lo, hi, hi - lo, block=block)
        return torch.empty_like(v).scatter_(-1, i - lo, v)

    whole = every_score(k, 0, N)
    for j in copies:
        assert torch.equal(whole[..., j], whole[..., N // 3]), j
    for lo, hi in ((1, N - 1), (2, 130), (N - 64, N)):  # ragged, and a multiple of REF_COLUMNS
        assert torch.equal(every_score(k, lo, hi), whole[..., lo:hi]), (lo, hi)
    for world in (2, 3):
        for rank in range(world):
            shard = k[rank::world]
            assert torch.equal(every_score(shard, 0, len(shard)), whole[..., rank::world]), (world, rank)
    # ties keep the lower index: the copies come out in ascending order
    _, i = score_topk_ref(q, k, 0, N, N, block=block)
    same = sorted([*copies, N // 3])
    picked = i[torch.isin(i, torch.tensor(same))].view(*i.shape[:2], len(same))
    assert (picked == torch.tensor(same)).all()


def rounding_bound(q, k, start, end):
    """``e``: a bound on ``|computed - exact|`` for any fp32 score of ``q`` against keys [start, end).

    Products of fp16/bf16 values are exact in fp32 (fp32 inputs round each product once more); a
    sum of d terms in any order, recursive or blocked (BLAS, tensor-core tiles), is off by at most
    about ``d * 2^-24 * sum_i |q_i k_i|`` (Higham's gamma_d), and ``sum_i |q_i k_i| <=
    ||q||_1 * max |k|``.
    """
    if end <= start:
        return 0.0
    d = q.shape[-1]
    l1 = q.float().abs().sum(-1).max().item()
    return (d + 1) * 2.0**-24 * l1 * k[start:end].float().abs().max().item()


def assert_equal_topk(v, i, rv, ri, topk):
    """``(v, i)`` equal the reference's first ``topk`` entries, bit for bit."""
    assert torch.equal(i, ri[..., :topk]), f"indices differ at {(i != ri[..., :topk]).nonzero()[:5].tolist()}"
    assert torch.equal(v, rv[..., :topk])


def _check(q, k, start, end, topk, v, i, exact):
    """The kernel's ``(v, i)`` against the reference, exactly (``exact``: integer-valued data, every
    score exact in fp32 whatever the order) or up to rounding: never a -1 where the row has keys,
    each score the key's own, scores within ``tol`` of the reference's, and the reference's index
    wherever its score stands more than ``tol`` apart from its neighbours (the (k+1)-th included)."""
    c, H, d = q.shape
    assert v.shape == i.shape == (c, H, topk) and v.dtype == torch.float32 and i.dtype == torch.int64
    rv, ri = score_topk_ref(q, k, start, end, topk + 1)  # one more: the gap below the k-th
    real = min(topk, end - start)
    assert (i[..., :real] >= start).all() and (i[..., :real] < end).all(), (
        f"index out of range or -1 at {((i[..., :real] < start) | (i[..., :real] >= end)).nonzero()[:5].tolist()}"
    )
    assert (i[..., real:] == -1).all() and (v[..., real:] == float("-inf")).all()
    if exact:
        assert_equal_topk(v, i, rv, ri, topk)
        return
    # The two-pass proof (two_pass._two_pass) bounds disagreements with the reference to keys
    # whose reference scores lie within 6e; 16e also covers an accumulator that truncates
    # instead of rounding (twice the unit roundoff), as tensor cores may.
    e = rounding_bound(q, k, start, end)
    tol = 16 * e
    iv, vv = i[..., :real], v[..., :real]
    assert (iv.sort(-1).values.diff(dim=-1) != 0).all(), "an index twice"
    assert (vv[..., :-1] >= vv[..., 1:]).all(), "not sorted"
    g = H // k.shape[1]
    kh = torch.arange(H, device=q.device) // g
    true = torch.einsum("chd,chtd->cht", q.double(), k.double()[iv, kh[None, :, None]])  # [c, H, real]
    torch.testing.assert_close(vv.double(), true, rtol=0, atol=2 * e)  # the returned key's own score
    torch.testing.assert_close(vv, rv[..., :real], rtol=0, atol=tol)
    gap = rv[..., :-1] - rv[..., 1:]  # [c, H, topk]: below each place; inf above padding
    gap = torch.where(rv[..., 1:] == float("-inf"), float("inf"), gap)
    sure = gap > tol
    sure[..., 1:] &= gap[..., :-1] > tol
    sure[..., real:] = False
    assert torch.equal(i[sure], ri[..., :topk][sure]), (
        f"indices differ where the reference's scores are {tol:.2e} apart: "
        f"{((i != ri[..., :topk]) & sure).nonzero()[:5].tolist()}"
    )


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
    "two-pass FILTER 1": {"TWO_PASS": True, "FILTER": 1},
}


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("case", INTERP_CASES + [(9, 9, 3, 64, 700, 3, 690, 4, 3)])
def test_kernel_matches_ref(case, ties, variant, device):
    # Integer ties put several entries above a row's threshold in one tile (the rounds path runs)
    # and make many tile maxima equal (the two-pass path must then keep the earliest tiles).
    c, H, Hkv, d, N, start, end, topk, splits = case
    if VARIANTS[variant]["TWO_PASS"]:
        topk = min(topk, 4)
    q, k = make(c, H, Hkv, d, N, torch.float16, ties, seed=sum(case[:-1]), device=device)
    v, i = score_topk_variant(q, k, start, end, topk, splits=splits, config=VARIANTS[variant])
    _check(q, k, start, end, topk, v, i, exact=ties)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("merge", [0, 1])
def test_device_end_row(merge, ties, device):
    # CUDA-graph decode passes the end row as a tensor the kernel reads on the device, with a launch
    # sized for [start, N): every end from empty to N, ragged tails and ends inside the first split,
    # must give what the host-end launch gives (exactly, on tie-heavy integer data).
    c, H, Hkv, d, N, start, topk = 1, 9, 3, 64, 300, 5, 4
    q, k = make(c, H, Hkv, d, N, torch.float16, ties, seed=7 + merge, device=device)
    cfg = {"TWO_PASS": False, "MERGE": merge}
    for end in (start, start + 1, start + 3, 64, 131, 255, N - 1, N):
        end_t = torch.tensor([end], device=device)
        v, i = score_topk_variant(q, k, start, end_t, topk, config=cfg, splits=3)
        _check(q, k, start, end, topk, v, i, exact=ties)
        hv, hi = score_topk_variant(q, k, start, end, topk, config=cfg)
        assert torch.equal(i, hi) and torch.equal(v, hv), end
    rv, ri = score_topk_ref(q, k, start, torch.tensor([131]), topk)  # the reference takes a tensor too
    assert torch.equal(ri, score_topk_ref(q, k, start, 131, topk)[1])


# Block shapes for the adversarial cases. In the interpreter the default picks BLOCK_M 16 or 32
# and BLOCK_M2 16; compiled, BLOCK_M up to 256 with 4-8 warps against BLOCK_M2 16 with 1 warp.
# Pass 1 and pass 2 then sum the same products in other orders (BLAS or tensor-core tiles).
SHAPES = {
    "one-pass MERGE 0": {"TWO_PASS": False, "MERGE": 0},
    "one-pass MERGE 1 64x64": {"TWO_PASS": False, "MERGE": 1, "BLOCK_M": 64, "BLOCK_N": 64},
    "two-pass default": {"TWO_PASS": True},
    "two-pass 16/16": {"TWO_PASS": True, "BLOCK_M": 16, "BLOCK_M2": 16},
    "two-pass 64/16": {"TWO_PASS": True, "BLOCK_M": 64, "BLOCK_M2": 16},
    "two-pass 64/32": {"TWO_PASS": True, "BLOCK_M": 64, "BLOCK_M2": 32},
    # The GPU's prefill default (64 rows in the interpreter, where padding rows cost programs).
    "two-pass 256x64/16": {"TWO_PASS": True, "BLOCK_M": 64 if common.INTERPRETED else 256, "BLOCK_N": 64,
                           "num_warps": 8, "num_stages": 3, "BLOCK_M2": 16, "num_warps2": 1, "num_stages2": 3},
    "two-pass 64/16 FILTER 1": {"TWO_PASS": True, "BLOCK_M": 64, "BLOCK_M2": 16, "FILTER": 1},
}  # fmt: skip
# 12 tokens x 2 heads over 1 KV head (24 rows); keys [5, 190) of 200: a ragged last tile for
# BLOCK_N 32 and 64, start > 0, end < N. (GQA packing over several KV heads: test_kernel_matches_ref.)
ADV = (12, 2, 1, 64, 200, 5, 190)


def _spots(start, end, block_n, gen):
    """Key positions spread over the range: one at a random offset of every tile of ``block_n``,
    two more in the first tile, the first and the last key (the ragged tail)."""
    spots = {start, start + 1, start + 2, end - 1}
    for t0 in range(start, end, block_n):
        spots.add(min(end - 1, t0 + int(torch.randint(0, block_n, (1,), generator=gen))))
    return sorted(spots)


def near_ties(c, H, Hkv, d, N, start, end, dtype, seed, device):
    """Keys whose scores tie exactly but come out a few ulps apart in fp32. Queries repeat each
    coordinate twice (``q[2m] == q[2m+1]``); one base key per KV head, positive and large, so it
    beats every random key in every row, is copied to every spot with random pairs of coordinates
    swapped: the exact score is the same, the fp32 sum adds the products in another order. Every
    row's winners are then the maxima of their tiles, all within a few ulps of ``tau``."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.rand(c, H, d // 2, generator=gen) + 0.5).repeat_interleave(2, dim=-1)
    k = torch.randn(N, Hkv, d, generator=gen) * 0.5
    base = torch.rand(Hkv, d // 2, 2, generator=gen) * 2 + 2
    for j in _spots(start, end, 32, gen):
        swap = torch.rand(Hkv, d // 2, 1, generator=gen) < 0.5
        k[j] = torch.where(swap, base.flip(-1), base).reshape(Hkv, d)
    k[start + 2] = k[start + 1]  # an exact tie too: same bits, lower index first
    return q.to(dtype).to(device), k.to(dtype).to(device)


def equal_maxima(c, H, Hkv, d, N, start, end, dtype, seed, device):
    """Integer data (every score exact) where many tiles share the same maximum: each spot holds
    the top key ``3 * ones`` (score ``3 * sum(q)``, above every other key since q > 0 and other
    keys are in {-1, 0, 1}) or that key less one coordinate (a runner-up, lower by one q_i)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(1, 3, (c, H, d), generator=gen).float()
    k = torch.randint(-1, 2, (N, Hkv, d), generator=gen).float()
    for j in _spots(start, end, 32, gen):
        k[j] = 3.0
        if torch.rand((), generator=gen) < 0.4:
            k[j, :, int(torch.randint(0, d, (1,), generator=gen))] = 2.0
    return q.to(dtype).to(device), k.to(dtype).to(device)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("topk", [1, 4])
def test_kernel_near_ties(topk, dtype, shape, device):
    # The issue-13 failure: a row's only winner at the k-th tile max, recomputed a few ulps lower
    # in pass 2. Here every winner is such a key.
    c, H, Hkv, d, N, start, end = ADV
    q, k = near_ties(c, H, Hkv, d, N, start, end, dtype, seed=topk, device=device)
    v, i = score_topk_variant(q, k, start, end, topk, config=SHAPES[shape])
    _check(q, k, start, end, topk, v, i, exact=False)


def test_near_ties_are_near_ties():
    # The generator does what the test above needs: copies' fp32 scores a few ulps apart.
    c, H, Hkv, d, N, start, end = ADV
    q, k = near_ties(c, H, Hkv, d, N, start, end, torch.float16, seed=1, device="cpu")
    rv, _ = score_topk_ref(q, k, start, end, 6)
    spread = (rv[..., 0] - rv[..., -1]) / torch.finfo(torch.float32).eps / rv[..., 0]  # ~ulps
    assert spread.max() > 0 and spread.max() < 16, spread.max()
    assert (rv[..., -1] > 100).all()  # copies, far above the random keys (|score| ~ 15 at most)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equal_tile_maxima(dtype, shape, device):
    c, H, Hkv, d, N, start, end = ADV
    q, k = equal_maxima(c, H, Hkv, d, N, start, end, dtype, seed=7, device=device)
    for topk in (1, 3):
        v, i = score_topk_variant(q, k, start, end, topk, config=SHAPES[shape])
        _check(q, k, start, end, topk, v, i, exact=True)


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("filt", [1, 0])
@pytest.mark.parametrize("ulps", [4, -4])
@pytest.mark.parametrize("topk", [1, 4])
def test_second_pass_needs_no_bit_identical_recomputation(topk, ulps, filt, device):
    # Pass 1 rounding the other way than pass 2, whatever this machine's BLAS or GPU does: tau
    # moved by a few ulps between the passes. Above, with a filter `s >= tau` alone, every row's
    # k-th winner (the key at tau) is dropped: -1 at topk 1.
    c, H, Hkv, d, N, start, end = ADV
    q, k = make(c, H, Hkv, d, N, torch.float16, ties=False, seed=11, device=device)
    cfg = {**default_config(c * H // Hkv, d, topk, two_pass=True), "FILTER": filt}
    tau, picks, ids, count = two_pass._first_pass(q, k, start, end, topk, None, cfg)
    toward = torch.full_like(tau, float("inf") if ulps > 0 else float("-inf"))
    for _ in range(abs(ulps)):
        tau = torch.where(torch.isfinite(tau), torch.nextafter(tau, toward), tau)
    v, i = two_pass._second_pass(q, k, start, end, topk, cfg, (tau, picks, ids, count))
    _check(q, k, start, end, topk, v, i, exact=False)
    if ulps > 0 and topk == 1 and filt == 1:  # the test bites: session 4's filter drops winners
        _, i_old = two_pass._second_pass(
            q, k, start, end, topk, {**cfg, "FILTER": 2}, (tau, picks, ids, count)
        )
        assert (i_old == -1).any()


def _interpreter_dot():
    """The interpreter's builder class if it computes ``tl.dot`` in ``create_dot`` (else None)."""
    if not common.INTERPRETED:
        return None
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    return builder if hasattr(builder, "create_dot") and hasattr(interpreter, "TensorHandle") else None


@pytest.mark.skipif(_interpreter_dot() is None, reason="needs triton's interpreter (create_dot)")
@pytest.mark.parametrize("filt", [1, 0])
def test_two_pass_under_shape_dependent_rounding(filt, monkeypatch):
    # Issue 13's fresh machine: its BLAS rounded 16-row blocks (pass 2) unlike 32-row ones (pass
    # 1), this machine's may not. Emulated whatever the BLAS: a 16-row dot sums its d products in
    # reverse order. With session 4's filter (FILTER 2) this fails as it did there.
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    builder = _interpreter_dot()
    dot = builder.create_dot

    def reversed_dot(self, a, b, *rest):
        if a.data.shape[0] == 16:
            a = TensorHandle(np.ascontiguousarray(a.data[:, ::-1]), a.dtype)
            b = TensorHandle(np.ascontiguousarray(b.data[::-1, :]), b.dtype)
        return dot(self, a, b, *rest)

    monkeypatch.setattr(builder, "create_dot", reversed_dot)
    c, H, Hkv, d, N, start, end = ADV
    cfg = {"TWO_PASS": True, "BLOCK_M": 32, "BLOCK_M2": 16}
    dropped = 0
    for topk, dtype in ((1, torch.float16), (4, torch.float32)):
        q, k = near_ties(c, H, Hkv, d, N, start, end, dtype, seed=topk, device="cpu")
        v, i = score_topk_variant(q, k, start, end, topk, config={**cfg, "FILTER": filt})
        _check(q, k, start, end, topk, v, i, exact=False)
        _, i_old = score_topk_variant(q, k, start, end, topk, config={**cfg, "FILTER": 2}, inexact=True)
        dropped += int((i_old == -1).sum())
    assert dropped > 0  # the emulation bites


@needs_kernel
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_dtypes_and_strides(dtype, device):
    # q as a strided view (heads of a wider tensor), as the engine's gathered q may be.
    c, H, Hkv, d, N = 2, 8, 2, 64, 100
    q_all, k = make(c, 2 * H, Hkv, d, N, dtype, ties=False, seed=3, device=device)
    q = q_all[:, H:]
    assert not q.is_contiguous()
    v, i = score_topk(q, k, 4, 97, 6)
    _check(q, k, 4, 97, 6, v, i, exact=False)


@needs_kernel
def test_launcher_rejects_bad_inputs():
    q, k = make(1, 8, 2, 64, 50, torch.float16, False, seed=1, device=DEVICE)
    assert supports(DEVICE) and not supports("cuda" if DEVICE == "cpu" else "cpu")
    with pytest.raises(AssertionError):
        score_topk(q, k.float(), 0, 50, 4)  # dtype mismatch
    with pytest.raises(AssertionError):
        score_topk(q[:, :7], k, 0, 50, 4)  # 7 heads over 2 KV heads
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 51, 4)  # end > N
    with pytest.raises(AssertionError):
        score_topk(q, k, 0, 50, MAX_TOPK + 1)
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"ONE_INSERT": True})  # v2's key, gone in v3
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 5, config={"TWO_PASS": True})  # keeps four tile maxima per row
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"TWO_PASS": True, "SCORE_ONLY": True}, inexact=True)
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"TWO_PASS": True, "FILTER": 3})
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"TWO_PASS": False, "FILTER": 0})  # a two-pass option
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"TWO_PASS": False, "SCORE_ONLY": True})  # inexact
    with pytest.raises(AssertionError):
        score_topk_variant(q, k, 0, 50, 4, config={"TWO_PASS": True, "FILTER": 2})  # inexact


def test_engine_launcher_takes_no_switch():
    # Tiles, paths, splits and the inexact benchmark baselines are reached only through the
    # private kernels/_variants.py: the launcher the engine calls always runs the exact defaults.
    assert list(inspect.signature(score_topk).parameters) == ["q", "k", "start", "end", "topk"]


@pytest.mark.skipif(
    common.triton is None or not (common.INTERPRETED or torch.cuda.is_available()), reason="needs triton"
)
@pytest.mark.parametrize("n_cand,topk", [(4, 4), (8, 4), (12, 3), (28, 4), (64, 1), (8, 2)])
def test_plan_lists_each_rows_best_tiles(n_cand, topk):
    # The step between the two passes, against its definition: per row the topk best candidates
    # by (tile max descending, tile ascending), tau the last of their maxima; per block of rows the
    # union of those tiles, ascending. Small integer maxima: many ties, decided by the tile.
    dev = "cpu" if common.INTERPRETED else "cuda"
    Hkv, rows_pad, bm = 2, 64, 16
    gen = torch.Generator().manual_seed(n_cand)
    a = torch.randint(0, 4, (Hkv, rows_pad, n_cand), generator=gen).float()
    a[0, 3, 1:] = float("-inf")  # a row with fewer listed tiles than topk
    t = torch.stack([torch.randperm(100, generator=gen)[:n_cand] for _ in range(Hkv * rows_pad)])
    t = t.view(Hkv, rows_pad, n_cand).int()
    t[0, 3, 1:] = two_pass.NO_TILE
    pad = max(2, common._next_pow2(topk))
    n_blocks = rows_pad // bm
    tau = torch.empty(Hkv, rows_pad, device=dev)
    picks = torch.empty(Hkv, rows_pad, pad, dtype=torch.int32, device=dev)
    ids = torch.empty(Hkv, n_blocks, bm * pad, dtype=torch.int32, device=dev)
    count = torch.empty(Hkv, n_blocks, dtype=torch.int32, device=dev)
    two_pass._plan_kernel[(n_blocks, Hkv)](
        a.to(dev), t.to(dev), tau, picks, ids, count, n_cand, rows_pad, n_blocks,
        TOPK=topk, TOPK_PAD=pad, BLOCK_M=bm, CAND_PAD=common._next_pow2(n_cand), num_warps=1,
    )  # fmt: skip
    order = (a * 1000 - t.float()).sort(dim=-1, descending=True).indices[..., :topk]
    want_t, want_a = t.gather(-1, order), a.gather(-1, order)
    assert torch.equal(tau.cpu(), want_a[..., -1])
    # Each row's own picks, in order; NO_TILE where it has fewer tiles, and past topk.
    want_picks = torch.where(want_a == float("-inf"), two_pass.NO_TILE, want_t)
    assert torch.equal(picks.cpu()[..., :topk], want_picks)
    assert (picks.cpu()[..., topk:] == two_pass.NO_TILE).all()
    for h in range(Hkv):
        for b in range(n_blocks):
            tiles = want_t[h, b * bm : (b + 1) * bm].unique()
            tiles = tiles[tiles != two_pass.NO_TILE].int()
            assert count[h, b].item() == len(tiles)
            assert torch.equal(ids[h, b, : len(tiles)].cpu(), tiles)


def _check_gpu(q, k, start, end, topk, config=None):
    v, i = score_topk_variant(q, k, start, end, topk, config=config)
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
    if c > 1:  # the same without the tau filter
        _check_gpu(q, k, 5, N, 4, {"TWO_PASS": True, "FILTER": 1})


@pytest.mark.gpu
@needs_gpu
def test_kernel_gpu_ties():
    # Integer-valued bf16: every score exact, many exact ties: must equal the reference exactly.
    q, k = make(64, 8, 2, 128, 50_000, torch.bfloat16, ties=True, seed=5, device="cuda")
    cases = ((1, None), (4, None), (4, {"TWO_PASS": False}), (4, {"TWO_PASS": True, "FILTER": 1}), (8, None),
             (32, None))  # fmt: skip
    for topk, cfg in cases:
        v, i = score_topk_variant(q, k, 3, 49_990, topk, config=cfg)
        _check(q, k, 3, 49_990, topk, v, i, exact=True)
