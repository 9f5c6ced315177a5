"""The selection probe (dist_reattn.probe) against brute force written with Python lists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_select import _rope

from dist_reattn.attention import apply_rope
from dist_reattn.cache import KVCache
from dist_reattn.config import ScopeConfig
from dist_reattn.probe import SelectionProbe, span_targets


@pytest.mark.parametrize("span", [1, 3, 4, 32])
def test_span_targets_are_the_keys_whose_span_reaches_the_answer(span):
    answer = [100, 101, 140]
    want = sorted(
        {j for j in range(0, 300) for t in answer if t in range(j - span // 2, j - span // 2 + span)}
    )
    assert span_targets(answer, span) == want


def brute_rank(scores: list[float], targets: list[int]) -> int:
    best = max(scores[t] for t in targets)
    return sum(s > best for s in scores)


def test_probe_ranks_equal_brute_force():
    gen = torch.Generator().manual_seed(5)
    H, Hkv, d, n_last, c = 4, 2, 8, 200, 10
    cfg = ScopeConfig(sink=4, local=40, chunk=c, topk=2, span=4, recall_clip=4)
    k, v = torch.randn(n_last, Hkv, d, generator=gen), torch.randn(n_last, Hkv, d, generator=gen)
    # Small integer queries and keys: many exact score ties, which count in the answer's favour.
    k = torch.randint(-1, 2, (n_last, Hkv, d), generator=gen).float()
    cache = KVCache(1, Hkv, d, n_last, torch.float32, torch.device("cpu"))
    cache.append(0, 0, k, v)
    cos, sin = _rope(d, 512)
    engine = SimpleNamespace(cache=cache, rope_table=lambda m: (cos[:m], sin[:m]))
    answer = [55, 56, 120]
    probe = SelectionProbe(n_last, answer, cfg)
    q = torch.randint(
        -1, 2, (2, c, H, d), generator=gen
    ).float()  # chunks ending at 190 and 200: the second is probed
    probe(engine, 0, q, n_last - 2 * c)  # a run whose chunks end at 180, 190: not probed
    assert all(r == [] for r in probe.ranks.values())
    probe(engine, 0, q, n_last - c)
    lo, hi = cfg.sink, n_last - cfg.local
    targets = [j - lo for j in span_targets(answer, cfg.span) if lo <= j < hi]
    query = q[1, -1]
    for name in ("paper", "qkv", "qkv2", "qk_pe"):
        want = []
        for h in range(H):
            qh = apply_rope(query[h], cos[cfg.local], sin[cfg.local]) if name == "qk_pe" else query[h]
            p = {"qkv": 1, "qkv2": 2}.get(name)
            scores = [
                float(qh @ k[j, h // 2]) * (float(v[j, h // 2].norm(p)) if p else 1.0) for j in range(lo, hi)
            ]
            want.append(brute_rank(scores, targets))
        assert probe.ranks[name] == [want], name
    blocks = [k[lo + i : min(lo + i + cfg.span, hi)].mean(0) for i in range(0, hi - lo, cfg.span)]
    answer_blocks = sorted({(t - lo) // cfg.span for t in answer if lo <= t < hi})
    want = [brute_rank([float(query[h] @ b[h // 2]) for b in blocks], answer_blocks) for h in range(H)]
    assert probe.ranks["block_mean"] == [want]
    assert probe.middle == hi - lo
    assert any(r > 0 for r in probe.ranks["paper"][0])  # not every head ranks it first: a real check


def test_probe_records_none_when_the_answer_is_in_the_local_window():
    cfg = ScopeConfig(sink=4, local=40, chunk=10, topk=2, span=4, recall_clip=4)
    cache = KVCache(1, 1, 4, 100, torch.float32, torch.device("cpu"))
    cache.append(0, 0, torch.randn(100, 1, 4), torch.randn(100, 1, 4))
    cos, sin = _rope(4, 64)
    probe = SelectionProbe(100, [90], cfg)
    probe(
        SimpleNamespace(cache=cache, rope_table=lambda m: (cos[:m], sin[:m])),
        0,
        torch.randn(1, 10, 2, 4),
        100,
    )
    assert all(r == [None] for r in probe.ranks.values())
    assert all(r == [None] for r in probe.fused.values())


def test_fused_ranks_equal_brute_force_over_heads_and_layers():
    """``zsum``/``psum`` fuse a layer's heads; ``*_upto`` every layer probed so far (two layers here)."""
    gen = torch.Generator().manual_seed(7)
    L, H, Hkv, d, n_last, c = 2, 4, 2, 8, 160, 8
    cfg = ScopeConfig(sink=4, local=32, chunk=c, topk=2, span=4, recall_clip=4)
    cache = KVCache(L, Hkv, d, n_last, torch.float32, torch.device("cpu"))
    for layer in range(L):
        cache.append(
            layer, 0, torch.randn(n_last, Hkv, d, generator=gen), torch.randn(n_last, Hkv, d, generator=gen)
        )
    cos, sin = _rope(d, 256)
    engine = SimpleNamespace(cache=cache, rope_table=lambda m: (cos[:m], sin[:m]))
    answer = [70, 71]
    probe = SelectionProbe(n_last, answer, cfg, selections=("paper",))
    lo, hi = cfg.sink, n_last - cfg.local
    targets = [j - lo for j in span_targets(answer, cfg.span) if lo <= j < hi]
    totals = {"z": [0.0] * (hi - lo), "p": [0.0] * (hi - lo)}
    for layer in range(L):
        q = torch.randn(1, c, H, d, generator=gen)
        probe(engine, layer, q, n_last)  # one chunk, ending at the prompt's end
        fused = {"z": [0.0] * (hi - lo), "p": [0.0] * (hi - lo)}
        for h in range(H):
            s = [float(q[0, -1, h] @ cache.k[layer, j, h // 2]) for j in range(lo, hi)]
            mean = sum(s) / len(s)
            std = (sum((x - mean) ** 2 for x in s) / (len(s) - 1)) ** 0.5
            e = [torch.tensor(x / d**0.5).exp().item() for x in s]
            for j in range(hi - lo):
                fused["z"][j] += (s[j] - mean) / std
                fused["p"][j] += e[j] / sum(e)
        for kind in "zp":
            totals[kind] = [a + b for a, b in zip(totals[kind], fused[kind], strict=True)]
            # float32 sums in another order: compare ranks away from exact float ties
            assert abs(probe.fused[f"{kind}sum"][layer] - brute_rank(fused[kind], targets)) <= 1, kind
            assert abs(probe.fused[f"{kind}sum_upto"][layer] - brute_rank(totals[kind], targets)) <= 1, kind
    assert probe.fused["zsum_upto"][0] == probe.fused["zsum"][0]
    assert len(probe.fused["zsum"]) == L
