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
