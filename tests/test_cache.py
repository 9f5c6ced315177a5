from __future__ import annotations

import pytest
import torch

from dist_reattn.cache import KVCache, local_capacity
from dist_reattn.config import ConfigError
from dist_reattn.models.spec import ModelSpec
from dist_reattn.plan import check_memory, plan_memory

SMOLLM2 = ModelSpec("llama", 30, 9, 3, 64, 576, 1536, 49152, 8192, True)


@pytest.mark.parametrize("world,page", [(1, 4), (2, 4), (3, 5), (4, 1)])
def test_striped_pages_hold_every_token_once_in_order(world, page):
    n = 61
    k = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 1, 2).contiguous()
    seen = []
    for rank in range(world):
        cache = KVCache(1, 1, 2, n, torch.float32, torch.device("cpu"), rank, world, page)
        for pos in range(0, n, 7):  # appended in uneven chunks
            cache.append(0, pos, k[pos : pos + 7], k[pos : pos + 7])
        rows = torch.arange(cache.local_count(n))
        g = cache.to_global(rows)
        assert torch.equal(cache.k[0, rows, 0, 0], g.float())  # each row holds its global token
        assert bool((g[1:] > g[:-1]).all())  # in global order
        assert torch.equal(cache.to_local(g), rows)
        assert bool(cache.owned_mask(g).all())
        lo, hi = cache.local_rows(10, 40)
        assert cache.to_global(torch.arange(lo, hi)).tolist() == [j for j in g.tolist() if 10 <= j < 40]
        # whole pages: this rank owns pages rank, rank + world, ... below ceil(n / page) (at least one)
        owned_pages = len(range(rank, -(-n // page), world))
        assert cache.local_capacity == local_capacity(n, world, page, rank) == max(1, owned_pages) * page
        seen += g.tolist()
    assert sorted(seen) == list(range(n))


def test_kv_bytes_match_design():
    # DESIGN section 5: 23,040 bytes per token in bf16.
    assert SMOLLM2.kv_bytes_per_token(2) == 23040
    plan = plan_memory(
        SMOLLM2,
        1 << 20,
        torch.bfloat16,
        torch.device("cpu"),
        chunk=512,
        max_scope=8192,
        full_mode=False,
        world=2,
    )
    assert plan.kv_bytes == (1 << 19) * 23040


def test_plan_refuses_with_numbers():
    plan = plan_memory(
        SMOLLM2, 64 << 20, torch.float32, torch.device("cpu"), chunk=512, max_scope=8192, full_mode=False
    )
    with pytest.raises(ConfigError, match=r"does not fit: 67108864 tokens need .*KV 2880\.00 GiB.*available"):
        check_memory(plan, 64 << 20, 1)


def test_cache_rejects_overflow():
    cache = KVCache(1, 1, 2, 8, torch.float32, torch.device("cpu"), page=4)
    with pytest.raises(RuntimeError, match="capacity"):
        cache.append(0, 6, torch.zeros(3, 1, 2), torch.zeros(3, 1, 2))


def test_fp8_keys_in_the_plan_and_the_cache():
    # scope.scoring=fp8: one byte per key element (the FP8 score keys) and an fp32 centre and scale per
    # (cached layer, KV head, channel), on top of K and V (and of qkv's weighted keys).
    args = dict(chunk=512, max_scope=8192, full_mode=False, world=2)
    exact = plan_memory(SMOLLM2, 1 << 20, torch.bfloat16, torch.device("cpu"), **args)
    fp8 = plan_memory(SMOLLM2, 1 << 20, torch.bfloat16, torch.device("cpu"), **args, fp8_keys=True)
    assert fp8.kv_bytes == exact.kv_bytes + (1 << 19) * 30 * 3 * 64 + 2 * 30 * 3 * 64 * 4  # k8; centre, scale
    both = plan_memory(
        SMOLLM2, 1 << 20, torch.bfloat16, torch.device("cpu"), **args, score_keys=True, fp8_keys=True
    )
    assert both.kv_bytes == (1 << 19) * 23040 * 3 // 2 + (1 << 19) * 30 * 3 * 64 + 2 * 30 * 3 * 64 * 4
    # the plan counts what the cache allocates
    spec = ModelSpec("llama", 2, 6, 3, 16, 96, 96, 128, 512, True)
    for world, norm in [(1, 0), (3, 1)]:
        plan = plan_memory(
            spec, 150, torch.float32, torch.device("cpu"), chunk=16, max_scope=64, full_mode=False,
            world=world, page=8, score_keys=bool(norm), fp8_keys=True,
        )  # fmt: skip
        cache = KVCache(2, 3, 16, 150, torch.float32, torch.device("cpu"), 0, world, 8, norm, fp8=True)
        assert plan.kv_bytes == cache.nbytes()


@pytest.mark.parametrize("norm", [0, 2])
def test_fp8_keys_are_the_score_keys_quantized_with_the_first_chunks_scale(norm):
    from dist_reattn.cache import score_keys
    from dist_reattn.kernels import key_center, key_scale, quantize_keys

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    k[30:] *= 8  # later keys beyond the scale saturate
    sk = score_keys(k, v, norm) if norm else k
    center = key_center(sk[:8])  # the first chunk's (scale_rows), whatever the first append holds
    scale = key_scale(sk[:8], center=center)
    want = quantize_keys(sk, scale, center=center)
    for world in (1, 2):
        for rank in range(world):
            cache = KVCache(1, 2, 8, 40, torch.float32, torch.device("cpu"), rank, world, 4, norm, fp8=True)
            cache.append(0, 0, k[:16], v[:16], scale_rows=8)
            cache.append(0, 16, k[16:39], v[16:39])
            cache.append_at(0, torch.tensor([39]), k[39:], v[39:])  # decode: a device position
            rows = torch.arange(cache.local_count(40))
            assert torch.equal(cache.k_scale[0], scale) and torch.equal(cache.k_center[0], center)
            assert torch.equal(
                cache.k8[0, rows].view(torch.uint8), want[cache.to_global(rows)].view(torch.uint8)
            )
