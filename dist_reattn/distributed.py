"""Process groups and every collective the engine uses, with bytes and time counted per kind.

The engine never calls ``torch.distributed`` itself: it holds a :class:`Comm` built here and passes
it down. A single process (no torchrun) is ``Comm.single()``: world size 1, collectives are local.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


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
            k: {"calls": self.calls[k], "bytes": self.bytes[k], "seconds": round(self.seconds[k], 6)}
            for k in self.calls
        }

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()


class Heartbeat:
    """Publishes this rank's count of collectives entered to the job's key-value store, every second.

    When a collective times out, the rank that waited reads everyone's count and names the ranks
    that never reached it (hung or dead), which the collective's own error cannot tell. A background
    thread keeps it off the hot path.

    Args:
        store: the process group's store (``torch.distributed`` Store).
        comm: the Comm whose ``calls`` are published.
    """

    def __init__(self, store, comm: Comm, interval_s: float = 1.0):
        self.store, self.comm, self.interval_s = store, comm, interval_s
        self._stop = threading.Event()
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="dist-reattn-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"dist_reattn/entered/{rank}"

    def _publish(self) -> None:
        self.store.set(self._key(self.comm.rank), str(self.comm.calls))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
            except Exception:  # the store went away with the job: nothing left to report to
                return

    def behind(self) -> str:
        """Which other ranks have not entered this rank's latest collective, e.g. ``rank 1 (entered #3)``.

        This rank is never listed: it is inside the collective, and its own entry in the store lags
        its live count by up to ``interval_s`` (it once named itself as the missing rank).
        """
        try:
            late = []
            for r in range(self.comm.world):
                if r == self.comm.rank:
                    continue
                key = self._key(r)
                entered = int(self.store.get(key)) if self.store.check([key]) else 0
                if entered < self.comm.calls:
                    late.append(f"rank {r} (entered #{entered})")
        except Exception as e:
            return f"the other ranks' progress is unreadable ({type(e).__name__})"
        return ", ".join(late) if late else "none behind (a rank may have died inside it)"

    def stop(self) -> None:
        """Ends the thread and waits for it: no publish may race the process group's teardown (a rank
        of a finished job once aborted in C++ at exit, its heartbeat inside the store)."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 10)


class Comm:
    """The collectives of one process group, counted per kind.

    Args:
        group: a ``torch.distributed`` process group, or None for a single process.
        rank, world: this rank and the group size.
    """

    def __init__(self, group=None, *, rank: int = 0, world: int = 1, timeout_s: float | None = None):
        if world > 1 and group is None:
            raise ValueError("a Comm of several ranks needs its process group")
        self.group, self.rank, self.world, self.timeout_s = group, rank, world, timeout_s
        self.stats = CollectiveStats()
        self.calls = 0  # collectives entered, for error messages
        self.profile = None  # a dist_reattn.profile.Profile; collectives are then timed as its phases
        self.heartbeat: Heartbeat | None = None
        self.owns_group = False  # set by init_from_env when it created the group (shutdown destroys it)

    @classmethod
    def single(cls) -> Comm:
        return cls(None, rank=0, world=1)

    @classmethod
    def of_group(cls, group, timeout_s: float | None = None) -> Comm:
        return cls(group, rank=dist.get_rank(group), world=dist.get_world_size(group), timeout_s=timeout_s)

    def _timed(self, kind: str, nbytes: int, fn):
        self.calls += 1
        t0 = time.perf_counter()
        try:
            with self.profile.phase(f"comm:{kind}") if self.profile else contextlib.nullcontext():
                out = fn()
        except RuntimeError as e:
            late = f"; not there: {self.heartbeat.behind()}" if self.heartbeat else ""
            raise RuntimeError(
                f"rank {self.rank}/{self.world}: collective #{self.calls} ({kind}) failed after "
                f"{time.perf_counter() - t0:.1f} s (timeout {self.timeout_s} s): another rank died or hangs{late}: {e}"
            ) from e
        self.stats.add(kind, nbytes, time.perf_counter() - t0)
        return out

    def all_gather(self, t: torch.Tensor, kind: str = "all_gather") -> torch.Tensor:
        """Stacks every rank's ``t`` (same shape on all ranks): returns ``[P, *t.shape]``.

        One ``all_gather_into_tensor`` into a buffer allocated once for the call: no per-rank list of
        tensors and no stack copy afterwards.
        """
        if self.world == 1:
            return t[None]
        flat = t.contiguous().reshape(-1)
        out = flat.new_empty(self.world * flat.numel())  # the ranks' tensors concatenated along dim 0
        # all_gather_single replaces all_gather_into_tensor in newer torch (same arguments)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        def run():
            fn(out, flat, group=self.group)
            return out.view(self.world, *t.shape)

        return self._timed(kind, t.numel() * t.element_size(), run)

    def all_to_all(self, t: torch.Tensor, kind: str = "all_to_all") -> torch.Tensor:
        """``t [P, ...]``: slice ``r`` goes to rank ``r``; returns ``[P, ...]`` with slice ``r`` from rank ``r``.

        Every slice has the same shape (padded by the caller), so no sizes are exchanged and nothing
        waits on the host. Bytes counted: what this rank sends to the others.
        """
        if self.world == 1:
            return t
        assert t.shape[0] == self.world, (t.shape, self.world)
        t = t.contiguous()
        out = torch.empty_like(t)
        sent = t.numel() * t.element_size() * (self.world - 1) // self.world
        return self._timed(kind, sent, lambda: dist.all_to_all_single(out, t, group=self.group) or out)

    def broadcast(self, t: torch.Tensor, src: int, kind: str = "broadcast") -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (same shape and dtype everywhere), in place; returns it."""
        if self.world == 1:
            return t
        t = t.contiguous()
        nbytes = t.numel() * t.element_size() if self.rank == src else 0
        return self._timed(kind, nbytes, lambda: dist.broadcast(t, src=src, group=self.group) or t)

    def all_reduce(self, t: torch.Tensor, kind: str = "all_reduce") -> torch.Tensor:
        """Sums ``t`` over the ranks, in place; returns it."""
        if self.world == 1:
            return t
        return self._timed(
            kind, t.numel() * t.element_size(), lambda: dist.all_reduce(t, group=self.group) or t
        )

    def reduce_scatter(self, t: torch.Tensor, kind: str = "reduce_scatter") -> torch.Tensor:
        """Sums ``t [P, ...]`` over the ranks; returns this rank's slice ``[...]`` of the sum."""
        if self.world == 1:
            return t[0]
        assert t.dim() >= 2 and t.shape[0] == self.world, (t.shape, self.world)
        out = t.new_empty(t.shape[1:])
        flat = t.contiguous().flatten(0, 1)  # the input is the ranks' slices concatenated along dim 0
        # reduce_scatter_single replaces reduce_scatter_tensor in newer torch (same arguments)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return self._timed(kind, t.numel() * t.element_size(), lambda: fn(out, flat, group=self.group) or out)

    def broadcast_object(self, obj, kind: str = "broadcast_object"):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        return self._timed(
            kind, 0, lambda: dist.broadcast_object_list(box, src=0, group=self.group) or box[0]
        )

    def all_gather_object(self, obj, kind: str = "all_gather_object") -> list:
        """Every rank's ``obj`` (any picklable value), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        return self._timed(kind, 0, lambda: dist.all_gather_object(out, obj, group=self.group) or out)

    def check_same(self, values: list[int], what: str) -> None:
        """Fails loudly, naming the ranks, unless every rank passed the same ``values``."""
        if self.world == 1:
            return
        mine = torch.tensor(values, dtype=torch.int64)
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            mine = mine.cuda()
        everyone = self.all_gather(mine, "consensus").cpu()
        differ = [r for r in range(self.world) if not torch.equal(everyone[r], everyone[0])]
        if differ:
            raise RuntimeError(
                f"ranks disagree on {what}: rank 0 has {everyone[0].tolist()}, ranks {differ} differ"
            )


def env_world() -> tuple[int, int, int, int] | None:
    """(rank, world, local_rank, local_world) from torchrun's or Slurm's variables; None if neither."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        return int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), int(e.get("LOCAL_WORLD_SIZE", world))
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        # srun started one task per rank (no torchrun): MASTER_ADDR/PORT come from the job script.
        world = int(e["SLURM_NTASKS"])
        local_world = int(e.get("SLURM_NTASKS_PER_NODE", e.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0])
        return int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), local_world
    return None


def init_from_env(timeout_s: float = 600.0, backend: str = "auto") -> Comm:
    """Joins the job's process group when launched by torchrun or srun; a plain process gets ``Comm.single()``.

    Args:
        timeout_s: a collective that waits longer than this (a dead or hung rank) fails the job.
        backend: ``auto`` (NCCL with GPUs, gloo without), ``nccl`` or ``gloo``.
    """
    found = env_world()
    if found is None:
        return Comm.single()
    rank, world, local_rank, local_world = found
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    # DeepSpeed's CPU shared-memory all-reduce reads LOCAL_SIZE; its launcher sets it, torchrun does not.
    os.environ.setdefault("LOCAL_SIZE", str(local_world))
    if os.environ.get("MASTER_ADDR") is None:
        raise RuntimeError(
            "MASTER_ADDR is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT for srun"
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        # Fail instead of hanging when a peer dies: the watchdog aborts the communicator after the timeout.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    created = not dist.is_initialized()  # else the caller's group: joined, never destroyed here
    if created:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    comm = Comm.of_group(dist.group.WORLD, timeout_s)
    comm.owns_group = created
    try:
        # The store init_process_group connected to (torchrun's or rank 0's); torch has no public getter.
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        store = None
    if store is not None:
        comm.heartbeat = Heartbeat(store, comm)
    return comm


def shutdown(comm: Comm) -> None:
    """Stops ``comm``'s heartbeat and destroys its process group if :func:`init_from_env` created it
    (a group the caller made stays theirs)."""
    global _groups_destroyed
    if comm.heartbeat is not None:
        comm.heartbeat.stop()
    if comm.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _groups_destroyed += 1


_groups_destroyed = 0  # process groups shutdown() destroyed in this process


def groups_destroyed() -> int:
    """How many process groups :func:`shutdown` has destroyed in this process."""
    return _groups_destroyed


def end_rank(code: int) -> NoReturn:
    """Ends a finished rank's process now with ``code``, skipping the interpreter's teardown.

    After ``destroy_process_group`` a gloo rank of ``launch/bench_comm.py`` (2 CPU ranks, torch 2.13)
    aborted at exit in about 1 of 30 runs (``terminate called without an active exception``, SIGABRT,
    no Python frame left: a C++ destructor), after writing its results, so torchrun failed the job.
    Ended this way: 0 aborts in 230 runs. Only for launch scripts (``cli.run_main``), never inside a
    user's process. Files the script wrote are closed by then; logging's handlers and the standard
    streams are flushed here; ``atexit`` handlers do not run.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
