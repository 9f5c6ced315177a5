"""Heartbeat.behind names only the ranks that really have not reached a collective (DESIGN section 7)."""

from __future__ import annotations

from types import SimpleNamespace

from dist_reattn.distributed import Heartbeat


class DictStore:
    """The three calls Heartbeat makes on a torch.distributed Store."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def test_rank_1_does_not_blame_itself_when_rank_0_died_early():
    store = DictStore()
    comm = SimpleNamespace(rank=1, world=2, calls=0)
    beat = Heartbeat(store, comm, interval_s=3600)  # publishes #0 now, then not again in this test
    try:
        # rank 1 enters its third collective before its next publish: its store entry still says 0,
        # and rank 0 (dead before publishing anything) has no entry at all.
        comm.calls = 3
        assert beat.behind() == "rank 0 (entered #0)"
        store.set("dist_reattn/entered/0", "3")  # rank 0 reached it: nobody is behind
        assert beat.behind().startswith("none behind")
    finally:
        beat.stop()


def test_ranks_behind_are_all_named():
    store = DictStore()
    comm = SimpleNamespace(rank=0, world=4, calls=5)
    beat = Heartbeat(store, comm, interval_s=3600)
    try:
        store.set("dist_reattn/entered/1", "5")
        store.set("dist_reattn/entered/2", "4")
        assert beat.behind() == "rank 2 (entered #4), rank 3 (entered #0)"
    finally:
        beat.stop()
