"""The retrieval step against a brute-force reference written with Python sets and dicts."""

from __future__ import annotations

import math

import pytest
import torch

from dist_reattn.cache import KVCache
from dist_reattn.config import ScopeConfig
from dist_reattn.select import local_topk, select_from_candidates, vote, widen


def brute_force_scope(q, k, n, cfg: ScopeConfig, heads: set[int] = frozenset()) -> list[int]:
    """DESIGN section 2 steps 3-6, written plainly over the dense score matrix; a pick of a head in
    ``heads`` (retrieval heads) counts more votes than all other picks together."""
    c, H, d = q.shape
    g = H // k.shape[1]
    lo, hi = cfg.sink, n - cfg.local
    picks = []  # (token, score, weight)
    for i in range(c):
        for h in range(H):
            scores = [(float(q[i, h] @ k[j, h // g]), j) for j in range(lo, hi)]
            scores.sort(key=lambda t: (-t[0], t[1]))
            picks += [(j, s, c * H * cfg.topk + 1 if h in heads else 1) for s, j in scores[: cfg.topk]]
    votes, best = {}, {}
    for j, s, w in picks:
        votes[j] = votes.get(j, 0) + w
        best[j] = max(best.get(j, float("-inf")), s)
    kept = sorted(votes, key=lambda j: (-votes[j], -best[j], j))[: cfg.recall_clip]
    selected = set()
    for j in kept:
        selected |= {t for t in range(j - cfg.span // 2, j - cfg.span // 2 + cfg.span) if lo <= t < hi}
    return list(range(cfg.sink)) + sorted(selected) + list(range(n - cfg.local, n))


def sharded_scope(q, k, n, cfg: ScopeConfig, world: int, page: int) -> list[int]:
    """The engine's path: every rank's local top-k over its striped shard, candidates stacked, merged."""
    all_s, all_i = [], []
    for rank in range(world):
        cache = KVCache(1, k.shape[1], k.shape[2], k.shape[0], k.dtype, k.device, rank, world, page)
        cache.append(0, 0, k, k)
        lo, hi = cache.local_rows(cfg.sink, n - cfg.local)
        s, rows = local_topk(q, cache.k[0], lo, hi, cfg.topk)
        all_s.append(s)
        all_i.append(cache.to_global(rows))
    scope = select_from_candidates(torch.stack(all_s), torch.stack(all_i), n, cfg)
    assert scope.tokens.numel() == cfg.max_scope()  # fixed size whatever the data
    # positions count the real entries in order, so RoPE sees 0..|scope|-1
    assert torch.equal(scope.positions[scope.valid], torch.arange(int(scope.valid.sum())))
    return scope.selected().tolist()


@pytest.mark.parametrize("world,page", [(1, 256), (2, 8), (3, 5), (4, 16)])
@pytest.mark.parametrize("integer_keys", [False, True])
def test_selection_matches_brute_force(world, page, integer_keys):
    gen = torch.Generator().manual_seed(world * 10 + page)
    c, H, Hkv, d, n = 3, 6, 2, 8, 157
    if integer_keys:  # small integers: many exact score ties, the tie-break rules decide
        q = torch.randint(-1, 2, (c, H, d), generator=gen).float()
        k = torch.randint(-1, 2, (n, Hkv, d), generator=gen).float()
    else:
        q, k = torch.randn(c, H, d, generator=gen), torch.randn(n, Hkv, d, generator=gen)
    cfg = ScopeConfig(sink=3, local=20, chunk=3, topk=3, span=5, recall_clip=6)
    expect = brute_force_scope(q, k, n, cfg)
    assert sharded_scope(q, k, n, cfg, world, page) == expect


def test_vote_tie_breaks():
    # token 7: 2 votes; tokens 3 and 9: 1 vote, same best score -> lower index (3) wins the last slot
    index = torch.tensor([[[7, 3], [7, 9]]])
    scores = torch.tensor([[[1.0, 5.0], [2.0, 5.0]]])
    assert kept(scores, index, 2) == [3, 7]
    # higher best score beats lower index at equal votes
    scores = torch.tensor([[[1.0, 4.0], [2.0, 5.0]]])
    assert kept(scores, index, 2) == [7, 9]
    # padding (-1) never votes
    assert kept(torch.tensor([[[1.0, float("-inf")]]]), torch.tensor([[[4, -1]]]), 5) == [4]


def kept(scores, index, recall_clip) -> list[int]:
    tokens, valid = vote(scores, index, recall_clip)
    assert tokens.shape == valid.shape == (recall_clip,)
    return sorted(tokens[valid].tolist())


@pytest.mark.parametrize("span", [1, 4, 7, 32])
def test_widen_is_the_sorted_union_of_the_clipped_spans(span):
    # Against a set union: hits packed closer than a span (overlaps of 2+ intervals), hits at the
    # edges of [lo, hi) (clipped), padding among the hits, a per-chunk hi.
    gen = torch.Generator().manual_seed(span)
    B, R, lo = 6, 12, 3
    hi = torch.tensor([40, 41, 60, 5, 100, 3])
    kept = torch.stack([torch.randperm(100, generator=gen)[:R] for _ in range(B)])  # distinct, as vote gives
    kept[0] = torch.tensor([10, 11, 12, 13, 3, 39, 14, 16, 0, 1, 2, 99])  # dense, and at both edges
    valid = torch.rand((B, R), generator=gen) < 0.8
    tokens, ok = widen(kept, valid, span, lo, hi)
    assert tokens.shape == ok.shape == (B, R * span)
    for b in range(B):
        want = sorted(
            {int(j) - span // 2 + o for j, v in zip(kept[b], valid[b], strict=True) if v for o in range(span)}
            & set(range(lo, int(hi[b])))
        )
        n = int(ok[b].sum())
        assert tokens[b, :n].tolist() == want and not ok[b, n:].any() and (tokens[b, n:] == 0).all()


def test_scope_recall_per_layer_at_one_step():
    from dist_reattn.select import scope_recall

    t = torch.tensor
    records = [
        (1, 100, t([0, 1, 50, 51, 99])),
        (0, 100, t([0, 1, 52, 99])),
        (0, 101, t([50, 51, 52, 53])),  # another step: ignored
    ]
    assert scope_recall(records, 100, [50, 51, 52, 52]) == [1 / 3, 2 / 3]  # layer order, duplicates once
    assert scope_recall(records, 101, [53]) == [1.0]
    assert scope_recall(records, 102, [53]) is None  # nothing recorded: every token attended
    with pytest.raises(ValueError, match="at least one token"):
        scope_recall(records, 100, [])


def _rope(d: int, m: int, theta: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables ``[m, d]`` for positions ``0..m-1``."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
    angles = torch.arange(m).double()[:, None] * inv[None]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


@pytest.mark.parametrize("select", ["qkv", "qkv2", "qk_pe"])
@pytest.mark.parametrize("world,page", [(1, 1), (3, 2)])
def test_scoring_variants_match_brute_force(select, world, page):
    """Each ``scope.select`` against the same brute force over its own definition: keys weighted by
    their value's norm, or both sides rotated at positions ``local`` apart (here at an arbitrary
    query position, so the rotated-query shortcut is checked, not assumed)."""
    from dist_reattn.attention import apply_rope
    from dist_reattn.select import Scoring, score_chunks

    gen = torch.Generator().manual_seed(7)
    c, H, Hkv, d, n = 2, 4, 2, 8, 140
    q, k, v = (
        torch.randn(c, H, d, generator=gen),
        torch.randn(n, Hkv, d, generator=gen),
        torch.randn(n, Hkv, d, generator=gen),
    )
    # Values whose norms vary a lot, so that weighting changes the winners.
    v = v * torch.rand(n, Hkv, 1, generator=gen) * 4
    cfg = ScopeConfig(sink=3, local=20, chunk=2, topk=2, span=3, recall_clip=5, select=select)
    cos, sin = _rope(d, 1000)
    if select == "qk_pe":
        p = 700  # any query position: R(p) q . R(p - local) k
        qb, kb = apply_rope(q, cos[p], sin[p]), apply_rope(k, cos[p - cfg.local], sin[p - cfg.local])
    else:
        norm = torch.linalg.vector_norm(v, 1 if select == "qkv" else 2, dim=-1, keepdim=True)
        qb, kb = q, k * norm
    expect = brute_force_scope(qb, kb, n, cfg)
    scoring = Scoring.of(cfg, lambda m: (cos[:m], sin[:m]))
    all_s, all_i = [], []
    for rank in range(world):
        cache = KVCache(
            1,
            Hkv,
            d,
            n,
            k.dtype,
            k.device,
            rank,
            world,
            page,
            score_norm={"qkv": 1, "qkv2": 2}.get(select, 0),
        )
        cache.append(0, 0, k, v)
        s, i = score_chunks(q[None], cache, 0, [n], cfg, scoring)
        all_s.append(s)
        all_i.append(i)
    scope = select_from_candidates(torch.stack(all_s), torch.stack(all_i), n, cfg)
    assert scope.row(0).selected().tolist() == expect
    assert expect != brute_force_scope(q, k, n, cfg)  # the variant chose otherwise than the paper here


@pytest.mark.parametrize("world,page", [(1, 1), (2, 3)])
def test_retrieval_heads_outvote_the_other_heads(world, page):
    """scope.heads: the listed heads' picks fill the clip first (their own votes, then best score,
    then index decide among them), and every rank agrees."""
    gen = torch.Generator().manual_seed(11)
    c, H, Hkv, d, n = 4, 6, 2, 8, 160
    q = torch.randint(-1, 2, (c, H, d), generator=gen).float()  # ties among the picks
    k = torch.randint(-1, 2, (n, Hkv, d), generator=gen).float()
    cfg = ScopeConfig(sink=3, local=20, chunk=4, topk=2, span=3, recall_clip=4)
    listed = {1, 4}
    expect = brute_force_scope(q, k, n, cfg, listed)
    assert expect != brute_force_scope(q, k, n, cfg)  # the weighting changed the scope here
    mask = torch.zeros(H, dtype=torch.bool)
    mask[list(listed)] = True
    all_s, all_i = [], []
    for rank in range(world):
        cache = KVCache(1, Hkv, d, n, k.dtype, k.device, rank, world, page)
        cache.append(0, 0, k, k)
        lo, hi = cache.local_rows(cfg.sink, n - cfg.local)
        s, rows = local_topk(q, cache.k[0], lo, hi, cfg.topk)
        all_s.append(s)
        all_i.append(cache.to_global(rows))
    scope = select_from_candidates(torch.stack(all_s)[:, None], torch.stack(all_i)[:, None], n, cfg, mask)
    assert scope.row(0).selected().tolist() == expect


def test_retrieval_heads_file_is_checked(tmp_path):
    from dist_reattn.config import ConfigError
    from dist_reattn.select import retrieval_heads

    good = tmp_path / "heads.json"
    good.write_text('{"heads": {"1": [0, 2]}, "min_share": 0.5}')
    masks = retrieval_heads(str(good), 3, 4, torch.device("cpu"))
    assert masks[0] is None and masks[2] is None and masks[1].tolist() == [True, False, True, False]
    assert retrieval_heads("", 2, 4, torch.device("cpu")) == [None, None]
    (tmp_path / "bad.json").write_text('{"heads": {"3": [0]}}')
    with pytest.raises(ConfigError, match="outside this model's 3 retrieving layers x 4 heads"):
        retrieval_heads(str(tmp_path / "bad.json"), 3, 4, torch.device("cpu"))
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a retrieval-heads file"):
        retrieval_heads(str(tmp_path / "junk.json"), 3, 4, torch.device("cpu"))


class _Gathered:
    """A communicator of ``world`` ranks whose all_gather returns what every rank would send: the
    test computes each rank's log-sum-exp first (the real collective runs in test_distributed)."""

    def __init__(self, world: int, every: torch.Tensor):
        self.world, self.every = world, every

    def all_gather(self, t, kind):
        return self.every


@pytest.mark.parametrize("world,page", [(1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("integer_keys", [False, True])
@pytest.mark.parametrize("device_end,distinct", [(False, False), (True, False), (False, True), (True, True)])
def test_mass_selection_matches_brute_force(world, page, integer_keys, device_end, distinct):
    """``scope.select=mass``: layer l keeps the recall_clip keys of largest softmax mass summed over
    the heads and the layers 0..l, ranked at MASS_BITS mantissa bits (ties: lower index), each
    widened by the span; with the end a host int (the prefill's step) or a ``[1]`` tensor (the
    static decode step), over a cache with spare rows past the end that hold NaN. ``distinct``:
    only the best key of each block of ``span`` middle tokens (from the sink on) competes; with
    several ranks a block's tokens lie on several ranks (pages shorter than the span)."""
    from dist_reattn.select import MASS_BITS, mass_candidates

    gen = torch.Generator().manual_seed(world * 7 + page + integer_keys)
    L, H, Hkv, d, n = 2, 4, 2, 8, 120
    cfg = ScopeConfig(
        sink=3, local=20, chunk=4, topk=2, span=3, recall_clip=12, select="mass", distinct=distinct
    )
    if integer_keys:  # exact ties in the masses: the lower index must win
        q = torch.randint(-1, 2, (L, H, d), generator=gen).float()
        k = torch.randint(-1, 2, (L, n, Hkv, d), generator=gen).float()
    else:
        q, k = torch.randn(L, H, d, generator=gen), torch.randn(L, n, Hkv, d, generator=gen)
    # Two keys of one block (tokens 40, 41: block (40 - sink) // span = 12) aligned with the queries:
    # both among the largest masses, so one hit per block must drop one of them.
    aligned = q.unflatten(1, (Hkv, H // Hkv)).sum(2).sign()  # [L, Hkv, d], in -1..1 like integer keys
    k[:, 40:42] = aligned[:, None] * (1 if integer_keys else 2)
    lo, hi = cfg.sink, n - cfg.local
    caches = []
    for rank in range(world):
        cache = KVCache(L, Hkv, d, n + 13, k.dtype, k.device, rank, world, page)
        cache.k.fill_(float("nan"))  # rows of no token yet: masked, whatever they hold
        for layer in range(L):
            cache.append(layer, 0, k[layer], k[layer])
        caches.append(cache)
    end = torch.tensor([n]) if device_end else n
    acc_brute = torch.zeros(n)
    accs = [None] * world
    differs = []
    for layer in range(L):
        s = torch.einsum("hd,nhd->hn", q[layer], k[layer, lo:hi].repeat_interleave(H // Hkv, 1)) / d**0.5
        lse = torch.logsumexp(s, 1)  # [H]
        acc_brute[lo:hi] += torch.exp(s - lse[:, None]).sum(0)
        ranked = [
            math.ldexp(round(m * 2**MASS_BITS) / 2**MASS_BITS, e)
            for m, e in map(math.frexp, acc_brute.tolist())
        ]
        order = sorted(range(lo, hi), key=lambda j: (-ranked[j], j))
        firsts = {}  # each block's first (best) key
        for j in order:
            firsts.setdefault((j - cfg.sink) // cfg.span, j)
        spread = [j for j in order if firsts[(j - cfg.sink) // cfg.span] == j]
        kept = (spread if distinct else order)[: cfg.recall_clip]
        differs.append(spread[: cfg.recall_clip] != order[: cfg.recall_clip])
        selected = {t for j in kept for t in range(j - 1, j + 2) if lo <= t < hi}
        expect = list(range(cfg.sink)) + sorted(selected) + list(range(n - cfg.local, n))
        all_s, all_i = [], []
        for rank, cache in enumerate(caches):
            comm = _Gathered(world, lse[None])  # logsumexp over one row: the global value itself
            sc, ix, accs[rank] = mass_candidates(q[layer], cache, layer, end, cfg, comm, accs[rank])
            all_s.append(sc)
            all_i.append(ix)
        scope = select_from_candidates(torch.stack(all_s), torch.stack(all_i), end, cfg)
        assert scope.row(0).selected().tolist() == expect, layer
    assert expect != brute_force_scope(q[1][None], k[1], n, cfg)  # not the paper's selection here
    assert any(differs)  # the planted pair: one hit per block changes the hits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 keys to cuBLAS, fp32 out)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mass_of_half_keys_on_a_gpu_equals_their_fp32_copy(dtype):
    """On a GPU ``mass_candidates`` scores half-precision keys with an fp32 cuBLAS result (no fp32
    copy of the cache): with integer keys and queries every dot product is exact either way, so the
    masses, their ranking (exact ties included) and the accumulated mass equal those of an fp32
    cache holding the same keys, bit for bit, over two layers, at a host and a device end."""
    from dist_reattn.select import mass_candidates

    gen = torch.Generator().manual_seed(5)
    L, H, Hkv, d, n = 2, 8, 2, 64, 3000
    cfg = ScopeConfig(sink=4, local=64, chunk=16, topk=2, span=4, recall_clip=31, select="mass")
    q = torch.randint(-2, 3, (L, H, d), generator=gen).float().cuda()
    k = torch.randint(-2, 3, (L, n, Hkv, d), generator=gen).float().cuda()
    for end in (n, torch.tensor([n], device="cuda")):
        got, want = [], []
        for keys, out in ((k.to(dtype), got), (k, want)):
            cache = KVCache(L, Hkv, d, n + 100, keys.dtype, keys.device)
            acc = None
            for layer in range(L):
                cache.append(layer, 0, keys[layer], keys[layer])
                sc, ix, acc = mass_candidates(
                    q[layer].to(keys.dtype), cache, layer, end, cfg, _Gathered(1, None), acc
                )
                out.append((sc, ix, acc))
        for (s1, i1, a1), (s2, i2, a2) in zip(got, want, strict=True):
            assert torch.equal(i1, i2) and torch.equal(s1, s2) and torch.equal(a1, a2)


@pytest.mark.parametrize("sink, local, chunk", [(4, 32, 16), (32, 4096, 512), (3, 20, 7)])
def test_fp8_sample_rows_against_brute_force(sink, local, chunk):
    # scope.scoring=fp8's agreement sample: query tokens t with (t - t0) % (16 * chunk) < 8, t0 the
    # first token of the first chunk that retrieves; one contiguous run of a step's rows.
    from dist_reattn.select import FP8_SAMPLE_EVERY, FP8_SAMPLE_TOKENS, sampled_rows

    cfg = ScopeConfig(sink=sink, local=local, chunk=chunk)
    t0 = (sink + local) // chunk * chunk
    period = FP8_SAMPLE_EVERY * chunk
    for first in range(0, 3 * period, max(1, chunk // 16)):
        for c in (1, chunk // 2 + 1, chunk):
            want = [i for i in range(c) if (first + i - t0) % period < FP8_SAMPLE_TOKENS]
            i0, i1 = sampled_rows(first, c, cfg)
            assert list(range(i0, i1)) == want, (first, c)
    assert sampled_rows(t0, chunk, cfg) == (0, min(chunk, FP8_SAMPLE_TOKENS))  # the first retrieving chunk
