"""What every run records per sequence: phase profile, collectives, memory and GPU telemetry, per rank.

meter = TrialMeter(engine)
meter.start()
gen = engine.generate(ids, max_new_tokens)
fields = meter.finish(gen)  # a collective: every rank calls it; merge ``fields`` into the record
"""

from __future__ import annotations

import os
import resource

import torch

from ..engine import Engine, Generation
from .telemetry import GpuSampler


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes this process held: the CUDA caching allocator's peak, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrialMeter:
    """Measures one sequence on every rank of the engine's group.

    Args:
        engine: the engine that runs the sequence (its comm, cache and profile are read).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        device = engine.model.device
        self.device = device
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        self.sampler = GpuSampler(index) if device.type == "cuda" else None

    def start(self) -> None:
        self.engine.comm.stats.reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.sampler:
            self.sampler.start()

    def finish(self, gen: Generation) -> dict:
        """The measured fields of a :class:`~dist_reattn.trial.Trial` (documented there): this rank's
        own numbers at the top level, every rank's under ``ranks``."""
        comm = self.engine.comm
        telemetry = (
            self.sampler.stop() if self.sampler else {"gpu": None, "note": "no GPU telemetry: CPU run"}
        )
        mine = {
            "rank": comm.rank,
            "kv_bytes": self.engine.cache.nbytes(),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "profile": gen.profile,
            "collectives": comm.stats.as_dict(),
            "telemetry": telemetry,
        }
        ranks = comm.all_gather_object(mine, "measure")
        return {
            "profile": gen.profile,
            "decode_ms_per_token": round(gen.decode_ms_per_token, 3),
            "decode_warmup_s": round(gen.decode_warmup_seconds, 3),
            "decode_graph": gen.decode_graph,
            "kv_bytes_per_rank": mine["kv_bytes"],
            "peak_memory_bytes": mine["peak_memory_bytes"],
            "collectives": mine["collectives"],
            "telemetry": telemetry,
            "ranks": ranks,
        }


def profile_line(profile: dict, stage: str = "prefill") -> str:
    """``scoring 41% | model 30% | ...`` for one stage of a :meth:`Profile.as_dict` profile."""
    p = profile.get(stage)
    if not p or not p["total_s"]:
        return f"{stage}: -"
    parts = sorted(p["seconds"].items(), key=lambda kv: -kv[1])
    return f"{stage} {p['total_s']:.2f} s: " + " | ".join(
        f"{k} {100 * v / p['total_s']:.0f}%" for k, v in parts if v >= 0.005 * p["total_s"]
    )
