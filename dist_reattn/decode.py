"""Decode: the one step of one token (:class:`StaticStep`), run eagerly or replayed as a CUDA graph.

A step of the prefill kind (:class:`~dist_reattn.engine.Step` with ``c = 1``) launches some 70 small
kernels per layer and reads several values back on the host; at 30 layers that is host-bound, tens of
ms per token where the bytes a token must read take a few. :class:`StaticStep` computes the token
with every shape fixed and the position on the device: append at ``pos``, score the middle
``[sink, pos + 1 - local)`` with the kernel reading its end row from device memory, select, gather
the scope ``[sink ; selected ; local]`` (``sink + recall_clip * span + local`` entries with padding)
and attend over it (:func:`select_attend`, fused by ``torch.compile`` on a GPU). It is the engine's
decode step wherever :func:`static_reason` allows (``Engine.decode_step``: eagerly, one token at a
time); :class:`GreedyDecoder` captures that step, the model around it and the argmax feeding the
next step into one CUDA graph and replays it per token where :func:`graph_reason` allows; the host
reads the tokens back every ``check_every`` tokens to stop at EOS.

With several ranks the static step exchanges the candidates and merges per-owner partial attention
by log-sum-exp (tested on gloo ranks); on GPUs those two NCCL collectives per layer are captured in
the graph with the rest (``torch.distributed`` enqueues them on the capturing stream), and every
rank replays the same graph, so the ranks stay in step without the host.

Decode reaches the engine only through :class:`EngineView` (``Engine.view()``), read-only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import exchange
from .attention import partial_attention
from .cache import KVCache, Window, owner_of, to_local
from .config import ScopeConfig
from .distributed import Comm
from .exchange import Part
from .profile import Profile
from .select import Scope, Scoring, fuses_mass, mass_candidates, retrieves, score_chunks, select_scope
from .sliding import LayerStep, SlidingLayers

if TYPE_CHECKING:
    from .models.adapter import ReAttnModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineView:
    """What decode reads of an engine, for the sequence in its cache (``Engine.view()``). Decode
    writes only through the cache's and the window's ``append_at``; the engine advances its own
    count of tokens from what :meth:`GreedyDecoder.run` returns."""

    model: ReAttnModel
    """``forward(ids, step)`` with ``step.attend`` as every attention layer's hook; ``device``,
    ``tensor_parallel``, ``layout``."""
    cache: KVCache
    window: Window
    """The replicated sink and recent tokens, kept current for the prefill's step."""
    comm: Comm
    sliding: SlidingLayers | None
    cache_slot: dict[int, int]
    """Model layer -> cache layer, for the layers that see every token."""
    q_heads: slice
    """The query heads this rank's attention returns (all, or its tensor-parallel share)."""
    scope: ScopeConfig
    scoring: Scoring
    heads: list[torch.Tensor | None]
    """Per cache layer, the retrieval heads (``scope.heads``) or None."""
    rope_table: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    """``m -> (cos, sin) [m, d]`` at positions ``0..m-1``, grown by the engine (read, never reallocated
    once grown to the step's scope)."""
    profile: Profile
    record: Callable[[int, int, Scope, bool], None] | None
    """``Engine.check_and_record`` when a debug option asks for every scope (read on the host), else None."""
    decode: str
    """``parallel.decode``: ``lse`` (this step) or ``gather`` (the prefill's step)."""
    n: int
    """Tokens in the cache."""
    capacity: int


def static_reason(view: EngineView) -> str | None:
    """Why the next decode token cannot run as a :class:`StaticStep` (the engine then uses the
    prefill's step), or None when it can: its scope must have the fixed ``[sink ; selected ; local]``
    layout, and attention the per-owner log-sum-exp form."""
    cfg = view.scope
    if view.decode != "lse":
        return "parallel.decode=gather (the scope's K/V is assembled on every rank: the prefill's step)"
    if cfg.mode == "full":
        return "full mode attends over every token (a scope that grows each step)"
    if view.n + 1 <= cfg.sink + cfg.local:
        return f"the cache holds {view.n} tokens, inside sink + local = {cfg.sink + cfg.local}"
    return None


def graph_reason(view: EngineView) -> str | None:
    """Why decode cannot run as CUDA graph replays of the static step now, or None when it can."""
    if view.model.device.type != "cuda":
        return "not a CUDA device"
    if view.model.tensor_parallel:
        return "tensor parallelism (AutoTP's all-reduces are not captured)"
    if view.record is not None:
        return "debug.record_selection / debug.check_consensus read every scope on the host"
    return static_reason(view)


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
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
        shared: a scope ``(tokens, valid, positions)`` ``[M]`` to attend instead of selecting one
            (``scope.select=mass_shared``'s second pass; ``candidates`` is then None).

    Returns:
        ``(out [H, d], lse [H])`` fp32, :func:`~dist_reattn.attention.partial_attention`'s partials
        (with one rank, ``out`` is the attention output), and the scope ``(tokens, valid, positions)``.
    """
    rank, world, page = owner
    if shared is None:
        scope = select_scope(cfg, n, 1, 1, candidates, q.device, heads)
        shared = scope.tokens[0], scope.valid[0], scope.positions[0]
    tokens, chosen, positions = shared  # [M]; padding holds token 0, masked
    valid = chosen & (owner_of(tokens, page, world) == rank)
    rows = to_local(tokens, page, world).clamp(max=cache_k.shape[0] - 1)  # (another rank's: masked)
    p = positions[-1:]  # [1]: the query is the scope's last token
    out, lse = partial_attention(
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
    return out, lse, shared


@functools.cache
def _fused():
    """:func:`select_attend` through ``torch.compile`` (built once: every step reuses its graphs)."""
    return torch.compile(select_attend, fullgraph=True, dynamic=False)


class StaticStep(LayerStep):
    """The step object of one decode token at device position ``pos`` (``[1]`` int64, the new token's
    index): the prefill step's selection, every shape fixed, nothing read on the host (unless
    ``view.record``).

    Attention is :func:`~dist_reattn.attention.partial_attention` over the scope tokens each rank
    owns (fp32 softmax, the padding masked), merged across ranks by log-sum-exp; the tokens agree
    with the prefill step's (``parallel.decode=gather``) up to rounding, and exactly with this step
    captured. On a GPU the selection and attention (:func:`select_attend`, some hundred small ops per
    layer) run through ``torch.compile``, which fuses them into a few kernels; compilation happens on
    the first step. Under tensor parallelism (eagerly only) the step all-gathers every head's q, k,
    v first, as the prefill step does, and returns this rank's query heads.

    ``scope.select=mass`` and ``mass_shared`` select by the fused attention mass
    (:func:`~dist_reattn.select.mass_candidates` at a device end, over every row of the cache);
    ``mass_shared`` runs the model twice per token (:meth:`forward`), as the prefill's step does.

    Args:
        view: the engine (:func:`static_reason` None).
        pos: ``[1]`` int64 on the engine's device; the caller advances it between steps.
        compile: fuse :func:`select_attend` with ``torch.compile`` (default: on a CUDA device).
    """

    def __init__(self, view: EngineView, pos: torch.Tensor, compile: bool | None = None):
        cfg = view.scope
        part = Part.of_step(1, cfg.chunk, view.comm.rank, view.comm.world, split=False)
        super().__init__(view.sliding, view.cache_slot, view.comm, view.profile, part, pos)
        self.view, self.pos = view, pos
        self.m = cfg.max_positions()
        view.rope_table(self.m)  # grown before any capture: the table is read, never reallocated
        self.tail = _fused() if (pos.is_cuda if compile is None else compile) else select_attend
        self.mass: torch.Tensor | None = None  # the fused mass of this token's earlier layers
        self.shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the 2nd pass's scope
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the last layer's scope

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The model over the one token ``ids [1]`` at ``pos``; its logits ``[vocab]``.

        ``scope.select=mass_shared``: a first pass in which layer ``l`` attends the keys of largest
        mass of layers ``0..l``, then a second in which every layer attends the first pass's last
        retrieving layer's scope; the token's K/V are written again at the same rows and the
        sliding layers' windows are put back in between (every shape fixed: a CUDA graph holds both).
        """
        model, cfg = self.view.model, self.view.scope
        if not (cfg.select == "mass_shared" and fuses_mass(cfg, 1)):
            return model.forward(ids, self)
        saved = self.sliding.state() if self.sliding is not None else None
        model.forward(ids, self)
        if saved is not None:
            self.sliding.restore(saved)
        self.shared = self.last
        try:
            return model.forward(ids, self)
        finally:
            self.shared = None

    def attend_cached(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        """Appends the token's K/V, selects its scope and attends.

        Args:
            q: ``[h, 1, d]``; k, v: ``[h_kv, 1, d]``; un-rotated, this rank's heads.

        Returns:
            ``[1, h, d]``.
        """
        view, prof = self.view, self.profile
        cfg, cache, comm = view.scope, view.cache, view.comm
        if view.model.tensor_parallel:  # the cache and the scoring take every head
            q, k, v = exchange.all_heads(comm, view.model.layout, q, k, v)
        with prof.phase("append"):
            kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [1, Hkv, d]
            cache.append_at(layer, self.pos, kt, vt)
            view.window.append_at(layer, self.pos, kt, vt)
        n = self.pos + 1  # [1] tokens in the cache, this one included
        candidates = None
        if retrieves(cfg) and self.shared is None:  # the Triton kernel reads its end row on the device
            with prof.phase("scoring"):
                if fuses_mass(cfg, 1):  # [1, 1, 1, recall_clip]; the earlier layers' mass in self.mass
                    acc = None if layer == 0 else self.mass
                    scores, index, self.mass = mass_candidates(q[:, 0], cache, layer, n, cfg, comm, acc)
                else:
                    q_all = q.transpose(0, 1)[None]  # [B = 1, c = 1, H, d]
                    scores, index = score_chunks(q_all, cache, layer, n, cfg, view.scoring)  # [1, 1, H, k]
            candidates = exchange.route_candidates(comm, None, scores, index)  # [P, 1, 1, H, k]
        with prof.phase("attention"):
            cos, sin = view.rope_table(self.m)
            owner = (cache.rank, cache.world, cache.page)
            args = (q[:, 0], candidates, n, cache.k[layer], cache.v[layer], cos, sin, scaling, cfg, owner)
            out, lse, scope = self.tail(*args, view.heads[layer], self.shared)
        if retrieves(cfg):
            self.last = scope
        if view.record is not None:
            view.record(layer, int(n), Scope(*scope[:2]), True)
        out = exchange.merge_across(comm, out, lse)  # [H, d]
        return out[view.q_heads].to(q.dtype)[None]


def attend_all(
    cache: KVCache,
    comm: Comm,
    layer: int,
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """One token over every token in the cache at its own position, split by owner: each rank attends
    over the tokens it holds, merged by log-sum-exp (decode with no fixed-size scope: ``full`` mode,
    a cache inside ``sink + local``).

    Args:
        q: ``[H, d]`` un-rotated query of all heads, the cache's last token.
        cos, sin: ``[n, d]`` rotary tables at positions ``0..n-1``, ``n`` tokens in the cache.

    Returns:
        ``[H, d]`` fp32.
    """
    n = cos.shape[0]
    tokens = torch.arange(n, device=q.device)
    tokens = tokens[cache.owned_mask(tokens)]
    rows = cache.to_local(tokens)
    k, v = cache.k[layer, rows].transpose(0, 1), cache.v[layer, rows].transpose(0, 1)  # [Hkv, n_r, d]
    out, lse = partial_attention(q, k, v, cos[tokens], sin[tokens], cos[n - 1], sin[n - 1], scaling)
    return exchange.merge_across(comm, out, lse)


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
    def fed(self) -> int:
        """Tokens the steps appended to the cache (steps past an EOS included)."""
        return self.warmup_steps + self.steps

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(self.steps, 1)


class GreedyDecoder:
    """Greedy tokens after a prefill, one :class:`StaticStep` per token, as a CUDA graph.

    Args:
        view: the engine after its prefill (``Engine.view()``); :func:`graph_reason` must be None
            when ``capture``, :func:`static_reason` in any case.
        capture: replay a CUDA graph (True) or run the same step eagerly (False: CPU tests, and a
            fallback when capture fails).
        warmup: eager steps before capture (Triton compiles, cuBLAS and cuDNN plan there).
        check_every: tokens between reads of the generated tokens on the host (the EOS check).
    """

    def __init__(self, view: EngineView, capture: bool = True, warmup: int = 2, check_every: int = 16):
        self.view, self.capture, self.warmup, self.check_every = view, capture, warmup, check_every
        dev = view.model.device
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)  # the token fed to the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its index in the sequence
        self.count = torch.zeros(1, dtype=torch.long, device=dev)  # tokens written to self.out
        self.out: torch.Tensor | None = None
        self.step = StaticStep(view, self.pos)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        """One token: the model over ``ids`` at ``pos``, its argmax into ``ids`` and ``out``."""
        logits = self.step.forward(self.ids)  # [vocab]
        token = logits.argmax().view(1)
        self.ids.copy_(token)
        self.out.index_copy_(0, self.count, token)
        self.pos.add_(1)
        self.count.add_(1)

    def run(self, first: int, max_new_tokens: int, eos: set[int]) -> Decoded:
        """Generates after ``first`` (the prefill's argmax) until EOS or ``max_new_tokens`` tokens in all.

        The warm-up (eager steps and the capture) is timed apart; without capture every step is
        steady state. The caller advances its count of tokens by :attr:`Decoded.fed`.
        """
        e = self.view
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
