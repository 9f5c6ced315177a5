"""The layout arithmetic behind the exchanges: how a step's chunks are shared, and the bound on the
rows any one rank owns of a scope, which sizes the compacted scope K/V exchange."""

from __future__ import annotations

import pytest
import torch

from dist_reattn.cache import KVCache
from dist_reattn.exchange import Part, fetch_capacity
from dist_reattn.select import widen


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("page", [1, 4, 64])
def test_no_rank_owns_more_of_a_scope_than_the_capacity(world, page):
    # Adversarial selections: hits packed together (spans merging into long runs), spread apart
    # (R separate runs), at the edges of the middle (clipped spans), and random.
    R, span, lo, hi = 16, 8, 4, 2000
    gen = torch.Generator().manual_seed(world * 100 + page)
    hits = [
        torch.arange(lo, lo + R * 3, 3),  # overlapping spans: a few long runs
        torch.arange(lo, hi, (hi - lo) // R)[:R],  # R separate runs
        torch.arange(hi - R, hi),  # clipped at the end of the middle
        torch.randint(lo, hi, (R,), generator=gen),
        torch.randint(lo, lo + 40, (R,), generator=gen),  # duplicates
    ]
    cap = fetch_capacity(R * span, R, page, world)
    cache = KVCache(1, 1, 16, hi + page * world, torch.float32, torch.device("cpu"), 0, world, page)
    for kept in hits:
        tokens, valid = widen(kept[None], torch.ones(1, R, dtype=torch.bool), span, lo, hi)
        owner = cache.owner_of(tokens[valid])
        most = max(int((owner == r).sum()) for r in range(world))
        assert most <= cap, (kept.tolist(), most, cap)
    assert cap <= R * span


def test_a_step_splits_into_contiguous_runs_of_chunks():
    part = Part.of_step(10 * 16, 16, rank=1, world=4, split=True)
    assert part.owner == (0, 0, 0, 1, 1, 2, 2, 2, 3, 3)
    assert part.span() == (48, 80) and part.counts() == [48, 32, 48, 32]
    assert part.owners_in(2, 5) == [1, 2, 2, 0]  # chunks 2..6 by rank
    assert part.mine_in(2, 5) == (1, 3)  # rank 1 attends the run's chunks 1 and 2
    assert Part.of_step(2 * 16, 16, rank=1, world=4, split=True).owner is None  # fewer chunks than ranks
    whole = Part.of_step(50, 16, rank=0, world=2, split=False)
    assert whole.span() == (0, 50) and whole.chunks[-1] == (48, 2) and whole.mine_in(0, 4) == (0, 4)
