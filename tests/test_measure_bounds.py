"""launch/measure_bounds.py: the block-bound and FP8-certificate figures on constructed keys."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "measure_bounds", Path(__file__).resolve().parents[1] / "launch" / "measure_bounds.py"
)
mb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mb)


def test_separable_keys_prune_every_block_but_one():
    # Every key tiny except one block of 64 that lines up with every query, and in it four keys
    # three times larger: that block's bound alone reaches the k-th score, and the four winners
    # stand far enough above every other key for FP8's error bound to certify them.
    gen = torch.Generator().manual_seed(0)
    c, H, Hkv, d, N = 8, 4, 2, 32, 1024
    q = torch.rand((c, H, d), generator=gen) + 1.0  # positive: the bound is tight
    k = torch.rand((N, Hkv, d), generator=gen) * 1e-3
    k[256:320] = 1.0 + torch.rand((64, Hkv, d), generator=gen) * 0.1
    k[300:304] = 3.0 + torch.rand((4, Hkv, d), generator=gen) * 0.1
    r = mb.measure_layer(q, k, topk=4, blocks=[32, 64, 128], kprimes=[4, 8])
    assert r["blocks_kept_B64"] == 1 / 16 and r["blocks_kept_B128"] == 1 / 8
    assert r["blocks_kept_B32"] <= 2 / 32
    assert r["certified_k8"] == 1.0 and r["contains_k8"] == 1.0


def test_invariants_on_random_keys():
    # Random keys: nothing separates them. What must hold whatever the data: a certified row
    # contains its exact top-k; more candidates contain more; nested blocks keep at least as many
    # keys as the blocks inside them.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((16, 6, 32), generator=gen)
    k = torch.randn((2048, 3, 32), generator=gen)
    r = mb.measure_layer(q, k, topk=4, blocks=[32, 64, 128], kprimes=[4, 16, 64])
    for kp in (4, 16, 64):
        assert 0 <= r[f"certified_k{kp}"] <= r[f"contains_k{kp}"] <= 1
    assert r["contains_k4"] <= r["contains_k16"] <= r["contains_k64"]
    assert r["blocks_kept_B32"] <= r["blocks_kept_B64"] <= r["blocks_kept_B128"] <= 1
    assert r["blocks_kept_B128"] > 0.5  # random high-dimensional keys: the bounds are nearly vacuous


def test_quantized_first_pass_bounds_hold_and_list_what_they_must():
    # Adversarial for the bound: an outlier channel (what pre-RoPE keys have), near-ties among the
    # winners, and a ragged tail (N not a multiple of any tile). measure_layer asserts internally
    # that every exact score lies within the bound; here: the two-pass must list the winners' tiles,
    # int8's bound is tighter than fp8's, and with a separated winner block round 2 adds nothing.
    gen = torch.Generator().manual_seed(2)
    c, H, Hkv, d, N = 8, 4, 2, 32, 1000
    q = torch.randn((c, H, d), generator=gen)
    k = torch.randn((N, Hkv, d), generator=gen)
    k[:, :, 3] *= 20.0  # outlier channel
    k[500:504] = k[500:501] * (1 + 1e-6 * torch.arange(4.0)).view(4, 1, 1)  # near-tied copies
    r = mb.measure_layer(q, k, 4, [64], [4, 16], tiles=(64, 128), quants=("int8", "fp8", "rank8"))
    for kind in ("int8", "fp8", "rank8"):
        for t in (64, 128):
            assert 0 < r[f"{kind}_tiles_T{t}_row"] <= r[f"{kind}_tiles_T{t}_blk16"] <= 1
            assert r[f"{kind}_tiles_T{t}_row"] <= r[f"{kind}_tiles_T{t}_blk16h"] <= 1
        assert r[f"{kind}_certified_k4"] <= r[f"{kind}_certified_k16"]
    assert r["int8_tiles_T64_row"] <= r["fp8_tiles_T64_row"]
    # separated: one block of 64 keys aligned with every query, far above the rest
    qp = torch.rand((c, H, d), generator=gen) + 1.0
    kp = torch.rand((N, Hkv, d), generator=gen) * 1e-2
    kp[256:320] = 2.0 + torch.rand((64, Hkv, d), generator=gen)
    r = mb.measure_layer(qp, kp, 4, [64], [4], tiles=(64,), quants=("int8",), ref=N)
    # round 1's k = 4 tiles per row and nothing more: the winners' tile floors every other bound
    assert r["int8_tiles_T64_row"] == 4 / 16
    assert r["int8_tiles_T64_blk16"] >= 4 / 16 and r["exact_tiles_T64_blk16"] >= 4 / 16


def test_quantized_bound_covers_every_pair():
    # The a-posteriori bound must hold for every (row, key) pair, whatever the data: here scaled so
    # that rounding is large (keys spanning many orders of magnitude), and, for the low-rank pass,
    # with keys past the first 100 (which fix the basis) off its span.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn((64, 16), generator=gen) * torch.logspace(-3, 3, 16)
    k = torch.randn((512, 16), generator=gen) * torch.logspace(3, -3, 16)
    s = q @ k.T
    for kind in ("int8", "fp8", "rank4", "rank8"):
        approx, a, cq, b, dd, extra = mb.first_pass(q, k, kind, ref=100)
        err = a[:, None] * b[None, :] + cq[:, None] * dd[None, :] + extra
        assert bool(((s - approx).abs() <= err).all())
        if not kind.startswith("rank"):  # the quantized bounds are not vacuous even here; the
            assert float(err.mean()) < float(s.abs().mean())  # low-rank one is (q lies off its span)
