"""Process groups and every collective the engine uses, with bytes and time counted per kind.

The engine never calls ``torch.distributed`` itself: it holds a :class:`Comm` built here and passes
it down. A single process (no torchrun) is ``Comm.single()``: world size 1, collectives are local.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class CollectiveStats:
    """Calls, bytes sent by this rank, and seconds, per collective kind."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds

    def as_dict(self) -> dict:
        return {
            k: {"calls": self.calls[k], "bytes": self.bytes[k], "seconds": self.seconds[k]}
            for k in self.calls
        }


class Comm:
    """One process group's collectives. ``group`` None means the default group when initialized."""

    def __init__(self, group=None, *, rank: int = 0, world: int = 1):
        self.group, self.rank, self.world = group, rank, world
        self.stats = CollectiveStats()

    @classmethod
    def single(cls) -> Comm:
        return cls(None, rank=0, world=1)

    def all_gather(self, t: torch.Tensor, kind: str = "all_gather") -> torch.Tensor:
        """Stacks every rank's ``t`` (same shape on all ranks): returns ``[P, *t.shape]``."""
        t0 = time.perf_counter()
        if self.world == 1:
            out = t[None]
        else:
            import torch.distributed as dist

            out = t.new_empty((self.world, *t.shape))
            dist.all_gather_into_tensor(out, t.contiguous(), group=self.group)
        self.stats.add(kind, t.numel() * t.element_size(), time.perf_counter() - t0)
        return out
