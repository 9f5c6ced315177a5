"""One trial harness and one record type: what ``launch/niah.py``, ``launch/ruler.py`` and batch jobs
(:mod:`dist_reattn.tasks.batch`) run and record for each generated sequence.

    harness = Harness(engine, cfg, prep)
    gen, trial = harness.run(ids, max_new_tokens, scope, on_chunk=bar.update)  # every rank calls it
    record = {"id": ..., "answer": ..., **trial.as_dict()}  # the task's own fields, then the trial's

Every field a trial adds to a record is documented once, on :class:`Trial`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import Config, ScopeConfig
from .engine import Engine, Generation
from .report.measure import TrialMeter
from .runtime import Prepared


@dataclass
class Trial:
    """The record fields of one generated sequence (rank 0's numbers; every rank's under ``ranks``)."""

    prompt_tokens: int
    """Tokens of the prompt, chat template included."""
    new_tokens: int
    """Tokens generated (EOS included when reached)."""
    seconds: float
    """Wall time of the generation: prefill and decode."""
    prefill_seconds: float
    decode_seconds: float
    """Steady-state decode; the steps before it are ``decode_warmup_s``."""
    prefill_tok_s: float
    decode_ms_per_token: float
    """Steady-state decode time per token."""
    decode_warmup_s: float
    """The first decode step (kernels compile for c = 1) and, with CUDA graphs, warm-up and capture."""
    decode_graph: bool
    """Whether the steady-state tokens came from CUDA graph replays."""
    scope: ScopeConfig
    """The scope the sequence was read with: recorded as its fields (``mode``, ``sink``, ``local``, ...)."""
    model: str
    """``model.path`` as configured."""
    device: str
    dtype: str
    world: int
    """Ranks in the job."""
    tensor_parallel: bool
    layout: str
    """``sequence`` or ``tensor`` with several ranks, ``single`` with one."""
    decode: str
    """``parallel.decode``: how decode attends with several ranks (``lse`` or ``gather``)."""
    memory_plan: dict
    """The plan made before the weights loaded (:class:`~dist_reattn.plan.MemoryPlan`), bytes per rank."""
    profile: dict
    """Per-stage, per-phase seconds and counters (:meth:`~dist_reattn.profile.Profile.as_dict`); under
    ``scope.scoring=fp8`` also ``fp8_rows_sampled`` and ``fp8_rows_equal``: the (query token, head) rows
    of the agreement sample and those whose top-k index set was the exact one, over this rank's
    shard (:class:`~dist_reattn.select.Scoring`)."""
    kv_bytes_per_rank: int
    peak_memory_bytes: int
    """The CUDA allocator's peak, or the process's peak RSS on a CPU."""
    collectives: dict
    """Calls and bytes per kind of collective (:class:`~dist_reattn.distributed.Comm` stats)."""
    telemetry: dict
    """GPU power, clocks and utilisation sampled during the trial, or a note on a CPU."""
    ranks: list
    """Every rank's own ``kv_bytes``, ``peak_memory_bytes``, ``profile``, ``collectives``, ``telemetry``."""

    def as_dict(self) -> dict:
        """The record's fields, the scope's fields at the top level, times rounded."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        scope = out.pop("scope")
        for name in (
            "seconds",
            "prefill_seconds",
            "decode_seconds",
            "decode_ms_per_token",
            "decode_warmup_s",
        ):
            out[name] = round(out[name], 3)
        out["prefill_tok_s"] = round(out["prefill_tok_s"], 1)
        return {**out, **dataclasses.asdict(scope)}


class Harness:
    """Runs and measures trials on one engine; every rank of its group calls :meth:`run` in step.

    Args:
        engine: the engine, built for the widest scope any trial reads with.
        cfg: the run's config (model path, layout, decode attention).
        prep: the model source and memory plan the engine was built from.
    """

    def __init__(self, engine: Engine, cfg: Config, prep: Prepared):
        self.engine, self.cfg, self.prep = engine, cfg, prep
        self.meter = TrialMeter(engine)

    def run(
        self,
        ids: list[int],
        max_new_tokens: int,
        scope: ScopeConfig,
        on_chunk: Callable[[int], None] | None = None,
    ) -> tuple[Generation, Trial]:
        """Generates greedily from ``ids`` reading with ``scope``; returns the generation and its record."""
        e, cfg = self.engine, self.cfg
        self.meter.start()
        t0 = time.perf_counter()
        gen = e.generate(ids, max_new_tokens, on_chunk=on_chunk, scope=scope)
        seconds = time.perf_counter() - t0
        measured = self.meter.finish(gen)
        trial = Trial(
            prompt_tokens=gen.prompt_tokens,
            new_tokens=len(gen.tokens),
            seconds=seconds,
            prefill_seconds=gen.prefill_seconds,
            decode_seconds=gen.decode_seconds,
            prefill_tok_s=gen.prefill_tok_s,
            scope=scope,
            model=cfg.model.path,
            device=str(self.prep.device),
            dtype=str(self.prep.dtype).replace("torch.", ""),
            world=e.comm.world,
            tensor_parallel=e.model.tensor_parallel,
            layout=cfg.parallel.layout if e.comm.world > 1 else "single",
            decode=cfg.parallel.decode,
            memory_plan=dataclasses.asdict(self.prep.plan),
            **measured,
        )
        return gen, trial
