"""Per-phase wall time of the engine: where a prefill or a decode spends its time.

Phases are exclusive: entering a phase pauses the one around it, so the phases of a stage add up to
the stage's time. Whatever runs outside every named phase (embeddings, norms, q/k/v and o
projections, MLPs, the LM head, Python) is ``model``.

On a GPU the phase boundaries are CUDA events recorded on the current stream, read once at the end
of each step: no synchronization inside a step, so the profile does not change what it measures
(each phase gets the stream time between its boundaries, idle gaps included). On the CPU they are
``perf_counter`` readings.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

BASE = "model"


class Profile:
    """Exclusive seconds per (stage, phase), plus counters per stage.

    Args:
        device: where the engine runs; CUDA devices are timed with events.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.stage = "prefill"
        self._stack: list[str] = []
        self._marks: list[tuple[object, str | None]] = []  # (clock reading, phase that ended there)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _boundary(self) -> None:
        self._marks.append((self._now(), self._stack[-1] if self._stack else None))

    def begin(self, stage: str) -> None:
        """Starts a step of ``stage`` (``prefill`` or ``decode``): time from here is ``model``."""
        self.stage, self._stack, self._marks = stage, [BASE], []
        self._boundary()

    def end(self, tokens: int) -> None:
        """Ends the step (``tokens`` new tokens) and adds its phase times to the stage's totals."""
        self._boundary()
        marks = self._marks
        if self.cuda:
            marks[-1][0].synchronize()
        for (t0, _), (t1, phase) in itertools.pairwise(marks):
            dt = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            self.seconds[self.stage][phase] += dt
        self.counts[self.stage]["steps"] += 1
        self.counts[self.stage]["tokens"] += tokens
        self._stack, self._marks = [], []

    @contextmanager
    def phase(self, name: str):
        """Times the enclosed work as ``name`` (exclusive of phases nested inside it)."""
        if not self._stack:  # outside a step: nothing to attribute to
            yield
            return
        self._boundary()
        self._stack.append(name)
        try:
            yield
        finally:
            self._boundary()
            self._stack.pop()

    def count(self, name: str, n: int | torch.Tensor = 1) -> None:
        """Adds to a counter of the current stage (e.g. layer steps). ``n`` may be a one-element
        device tensor: the sum then stays on the device until :meth:`as_dict` reads it (no sync)."""
        self.counts[self.stage][name] += n

    def add(self, stage: str, phase: str, seconds: float, tokens: int, steps: int) -> None:
        """Adds time measured outside :meth:`begin`/:meth:`end` (a CUDA graph replays many steps at once)."""
        self.seconds[stage][phase] += seconds
        self.counts[stage]["steps"] += steps
        self.counts[stage]["tokens"] += tokens

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def as_dict(self) -> dict:
        """``{stage: {"seconds": {phase: s}, "total_s": s, "steps": n, "tokens": n, ...}}``."""
        out = {}
        for stage in sorted(set(self.seconds) | set(self.counts)):
            phases = {k: round(v, 6) for k, v in sorted(self.seconds[stage].items())}
            counts = {k: int(v) for k, v in self.counts[stage].items()}
            out[stage] = {"seconds": phases, "total_s": round(sum(phases.values()), 6), **counts}
        return out
