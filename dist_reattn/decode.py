"""Greedy decode with the host out of the loop: one static step per token, replayed as a CUDA graph.

A plain decode step (:class:`~dist_reattn.engine.Step` with ``c = 1``) launches some 70 small
kernels per layer and reads several values back on the host; at 30 layers that is host-bound, tens of
ms per token where the bytes a token must read take a few. :class:`StaticStep` computes the same
token with every shape fixed and the position on the device: append at ``pos``, score the middle
``[sink, pos + 1 - local)`` with the kernel reading its end row from device memory, select, gather
the scope ``[sink ; selected ; local]`` (``sink + recall_clip * span + local`` entries with padding)
and attend over it (:func:`select_attend`, fused by ``torch.compile`` on a GPU). :class:`GreedyDecoder` captures that step, the model around it and the
argmax feeding the next step into one CUDA graph and replays it per token; the host reads the tokens
back every ``check_every`` tokens to stop at EOS.

Where graphs do not apply (CPU, tensor parallelism, ``full`` mode, a cache still inside
``sink + local``), the engine keeps its plain step; ``GreedyDecoder(capture=False)`` runs the static
step eagerly, which is what the tests compare with the plain step on CPU. With several ranks the
static step exchanges the candidates and merges per-owner partial attention by log-sum-exp, as the
plain step does (tested on gloo ranks); on GPUs those two NCCL collectives per layer are captured in
the graph with the rest (``torch.distributed`` enqueues them on the capturing stream), and every
rank replays the same graph, so the ranks stay in step without the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from . import exchange
from .attention import merge_partials, partial_attention
from .cache import owner_of, to_local
from .config import ScopeConfig
from .exchange import Part
from .select import retrieves, score_chunks, select_scope

log = logging.getLogger(__name__)


def graph_reason(engine) -> str | None:
    """Why the engine's decode cannot run as a CUDA graph now, or None when it can.

    Args:
        engine: an :class:`~dist_reattn.engine.Engine` after its prefill (``engine.n`` tokens).
    """
    cfg = engine.scope
    if engine.model.device.type != "cuda":
        return "not a CUDA device"
    if engine.comm.world > 1 and engine.decode_attention != "lse":
        return "parallel.decode=gather (the graph step merges per-owner partials by log-sum-exp)"
    if engine.model.tensor_parallel:
        return "tensor parallelism"
    if cfg.mode == "full":
        return "full mode attends over every token (a scope that grows each step)"
    if cfg.select == "mass":
        return "scope.select=mass selects in the plain step (not captured yet)"
    if engine.sliding is not None and engine.n < engine.sliding.window - 1:
        return f"the cache holds {engine.n} tokens, fewer than a sliding window"
    if engine.n + 1 <= cfg.sink + cfg.local:
        return f"the cache holds {engine.n} tokens, inside sink + local = {cfg.sink + cfg.local}"
    return None


def select_attend(
    q: torch.Tensor,
    candidates: tuple[torch.Tensor, torch.Tensor] | None,
    n: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    cfg: ScopeConfig,
    owner: tuple[int, int, int],
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token's scope, and its attention over the scope tokens this rank holds: fixed
    shapes, nothing read on the host.

    Args:
        q: ``[H, d]`` un-rotated query.
        candidates: ``(scores, index)`` ``[P, 1, 1, H, k]`` every rank's exact top-k of this token
            over its middle keys (global indices), or None for a mode that retrieves nothing.
        n: ``[1]`` tokens in the cache, this one included.
        cache_k, cache_v: ``[N_local, Hkv, d]`` this rank's cache of one layer.
        cos, sin: ``[>= M, d]`` rotary tables for scope positions.
        owner: ``(rank, world, page)`` of the cache: each rank attends over the scope tokens it owns.
        heads: ``[H]`` bool, the layer's retrieval heads (``scope.heads``), or None.

    Returns:
        ``(out [H, d], lse [H])`` fp32, :func:`~dist_reattn.attention.partial_attention`'s partials
        (with one rank, ``out`` is the attention output).
    """
    rank, world, page = owner
    scope = select_scope(cfg, n, 1, 1, candidates, q.device, heads)
    tokens, positions = scope.tokens[0], scope.positions[0]  # [M]; padding holds token 0, masked
    valid = scope.valid[0] & (owner_of(tokens, page, world) == rank)
    rows = to_local(tokens, page, world).clamp(max=cache_k.shape[0] - 1)  # (another rank's: masked)
    p = positions[-1:]  # [1]: the query is the scope's last token
    return partial_attention(
        q,
        cache_k[rows].transpose(0, 1),  # [Hkv, M, d]
        cache_v[rows].transpose(0, 1),
        cos[positions],
        sin[positions],
        cos[p],
        sin[p],
        scaling,
        valid,
    )


class StaticStep:
    """The step object of one decode token at device position ``pos`` (``[1]`` int64, the new token's
    index): the plain step's selection, every shape fixed, nothing read back on the host.

    Attention is :func:`~dist_reattn.attention.partial_attention` over the scope tokens each rank
    owns (fp32 softmax, the padding masked), merged across ranks by log-sum-exp as the plain step's
    ``lse`` decode does; the tokens agree with the plain step's up to rounding, and exactly with this
    step run uncaptured. On a GPU the selection and attention (:func:`select_attend`, some hundred
    small ops per layer) run through ``torch.compile``, which fuses them into a few kernels;
    compilation happens on the first step.

    Args:
        engine: the engine (a mode with a bounded scope, a cache past ``sink + local``, not
            tensor-parallel).
        pos: ``[1]`` int64 on the engine's device; the caller advances it between steps.
        compile: fuse :func:`select_attend` with ``torch.compile`` (default: on a CUDA device).
    """

    def __init__(self, engine, pos: torch.Tensor, compile: bool | None = None):
        assert not engine.model.tensor_parallel, "the static step runs the whole model on every rank"
        self.engine, self.pos = engine, pos
        cfg = engine.scope
        self.m = cfg.sink + (cfg.recall_clip * cfg.span if retrieves(cfg) else 0) + cfg.local
        engine.rope_table(self.m)  # grown before any capture: the table is read, never reallocated
        self.part = Part.of_step(1, cfg.chunk, engine.comm.rank, engine.comm.world, split=False)
        if compile is None:
            compile = pos.is_cuda
        self.tail = torch.compile(select_attend, fullgraph=True, dynamic=False) if compile else select_attend

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """Appends the token's K/V, selects its scope and attends (``Step.attend``'s contract, c = 1).

        Args:
            q: ``[H, 1, d]``; k, v: ``[Hkv, 1, d]``; un-rotated, every head.

        Returns:
            ``[1, H, d]``.
        """
        e, cfg, cache, comm = self.engine, self.engine.scope, self.engine.cache, self.engine.comm
        scaling = scaling or q.shape[-1] ** -0.5
        if e.sliding is not None and layer in e.sliding.layers:
            # Its own window, fixed shapes already; past the first W - 1 tokens every kept row is a
            # real token, whatever n0 says beyond that (graph_reason checks).
            return e.sliding.attend_step(comm, self.part, e.sliding.window, layer, q, k, v, scaling)
        layer = e.cache_slot[layer]  # the layer's index in the cache
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [1, Hkv, d]
        cache.append_at(layer, self.pos, kt, vt)
        e.window.append_at(layer, self.pos, kt, vt)
        n = self.pos + 1  # [1] tokens in the cache, this one included
        candidates = None
        if retrieves(cfg):  # the Triton kernel reads its end row on the device
            q_all = q.transpose(0, 1)[None]  # [B = 1, c = 1, H, d]
            scores, index = score_chunks(q_all, cache, layer, n, cfg, e.scoring)  # [1, 1, H, k]
            candidates = exchange.route_candidates(comm, None, scores, index)  # [P, 1, 1, H, k]
        cos, sin = e.rope_table(self.m)
        owner = (cache.rank, cache.world, cache.page)
        out, lse = self.tail(
            q[:, 0],
            candidates,
            n,
            cache.k[layer],
            cache.v[layer],
            cos,
            sin,
            scaling,
            cfg,
            owner,
            e.heads[layer],
        )
        if comm.world > 1:
            every = exchange.gather_partials(comm, torch.cat([out, lse[:, None]], dim=1))  # [P, H, d + 1]
            out = merge_partials(every[..., :-1], every[..., -1])
        return out.to(q.dtype)[None]


@dataclass
class Decoded:
    """Greedy tokens after a prefill and the time they took."""

    tokens: list[int]
    """Every generated token up to and including the first EOS (the prefill's argmax first)."""
    warmup_seconds: float
    """The first steps: the c = 1 kernels compile there and, with a graph, capture follows them."""
    warmup_steps: int
    seconds: float
    """Steady state: the steps after the warm-up."""
    steps: int
    """Steps timed by ``seconds`` (graph replays may run a few past an EOS before the host sees it)."""
    graph: bool
    """Whether the steady-state steps were CUDA graph replays."""

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(self.steps, 1)


class GreedyDecoder:
    """Greedy tokens after a prefill, one :class:`StaticStep` per token, as a CUDA graph.

    Args:
        engine: the engine after its prefill; :func:`graph_reason` must be None when ``capture``.
        capture: replay a CUDA graph (True) or run the same step eagerly (False: CPU tests, and a
            fallback when capture fails).
        warmup: eager steps before capture (Triton compiles, cuBLAS and cuDNN plan there).
        check_every: tokens between reads of the generated tokens on the host (the EOS check).
    """

    def __init__(self, engine, capture: bool = True, warmup: int = 2, check_every: int = 16):
        self.engine, self.capture, self.warmup, self.check_every = engine, capture, warmup, check_every
        dev = engine.model.device
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)  # the token fed to the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its index in the sequence
        self.count = torch.zeros(1, dtype=torch.long, device=dev)  # tokens written to self.out
        self.out: torch.Tensor | None = None
        self.step = StaticStep(engine, self.pos)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        """One token: the model over ``ids`` at ``pos``, its argmax into ``ids`` and ``out``."""
        logits = self.engine.model.forward(self.ids, self.step)  # [vocab]
        token = logits.argmax().view(1)
        self.ids.copy_(token)
        self.out.index_copy_(0, self.count, token)
        self.pos.add_(1)
        self.count.add_(1)

    def run(self, first: int, max_new_tokens: int, eos: set[int]) -> Decoded:
        """Generates after ``first`` (the prefill's argmax) until EOS or ``max_new_tokens`` tokens in all.

        The warm-up (eager steps and the capture) is timed apart; without capture every step is
        steady state.
        """
        e = self.engine
        steps = max_new_tokens - 1  # tokens still to generate, one step each
        if e.n + steps > e.capacity:
            raise RuntimeError(f"sequence of {e.n + steps} tokens exceeds the engine's capacity {e.capacity}")
        sync = torch.cuda.synchronize if self.ids.is_cuda else (lambda: None)
        self.out = torch.full((steps + 1,), -1, dtype=torch.long, device=self.ids.device)
        self.out[0], self.ids[0], self.pos[0], self.count[0] = first, first, e.n, 1
        done = 1  # entries of self.out filled (the first came from the prefill)
        stop = 0 if first in eos else None  # index of the first EOS in self.out
        t0 = time.perf_counter()
        if self.capture:
            while stop is None and done <= min(steps, self.warmup):
                self._body()
                done += 1
            stop = self._stop_at(eos, 1, done)
            if stop is None and done <= steps:
                self._capture()
        sync()
        t1 = time.perf_counter()
        warm = done
        while stop is None and done <= steps:
            batch = min(self.check_every, steps + 1 - done)
            for _ in range(batch):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._body()
            done += batch
            stop = self._stop_at(eos, done - batch, done)
        sync()
        t2 = time.perf_counter()
        e.n = e.window.n = int(self.pos)  # tokens in the cache (steps past an EOS included)
        tokens = self.out[: done if stop is None else stop + 1].tolist()
        return Decoded(tokens, t1 - t0, warm - 1, t2 - t1, done - warm, self.graph is not None)

    def _stop_at(self, eos: set[int], lo: int, hi: int) -> int | None:
        """Index of the first EOS among ``out[lo:hi]`` (reads them on the host), or None."""
        for i, t in enumerate(self.out[lo:hi].tolist()):
            if t in eos:
                return lo + i
        return None

    def _capture(self) -> None:
        """Records one :meth:`_body` as a CUDA graph (``torch.cuda.graph`` captures on a side stream);
        capture runs nothing, so the state is untouched. On a failure logs why and stays eager."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as err:  # an op that cannot be captured on this stack
            log.warning(f"CUDA graph capture failed, decoding eagerly: {str(err).splitlines()[0]}")
            return
        self.graph = graph
