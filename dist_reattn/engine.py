"""Chunked prefill, greedy decode and generation in the modes reattention / streaming / full.

One :class:`Engine` owns the preallocated KV cache for up to ``capacity`` tokens and runs one
sequence at a time (``reset`` between sequences). Each forward of a prefill slab is one :class:`Step`
and each decode token one :class:`~dist_reattn.decode.StaticStep` (where it applies): the model's
attention layers call ``step.attend`` with their un-rotated q, k, v.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import exchange
from .attention import scope_attention
from .cache import KVCache, Window
from .config import ScopeConfig, ScopeLimits
from .decode import Decoded, EngineView, GreedyDecoder, StaticStep, attend_all, graph_reason, static_reason
from .distributed import Comm
from .exchange import Part
from .models.adapter import ReAttnModel
from .profile import Profile
from .select import (
    Scope,
    Scoring,
    check_fp8_scoring,
    fuses_mass,
    mass_candidates,
    retrieval_heads,
    retrieves,
    score_chunks,
    select_scope,
)
from .sliding import LayerStep, SlidingLayers


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (EOS included when reached)."""
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    profile: dict
    """Per-stage, per-phase seconds and counters (:meth:`Profile.as_dict`)."""
    decode_tokens: int = 0
    """Tokens made by the steps that ``decode_seconds`` times (steady state)."""
    decode_warmup_seconds: float = 0.0
    """The decode steps before steady state: the first one (kernels compile for c = 1) and, with CUDA
    graphs, the eager warm-up steps and the capture."""
    decode_graph: bool = False
    """Whether the steady-state tokens came from CUDA graph replays."""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_ms_per_token(self) -> float:
        """Steady-state decode: warm-up (compilation, capture) excluded."""
        return 1e3 * self.decode_seconds / max(self.decode_tokens, 1)


class Step(LayerStep):
    """One forward of ``c`` new tokens at global positions ``[n0, n0 + c)``.

    In prefill a step is a slab of one or more chunks of ``scope.chunk`` tokens: the model's
    per-token work (norms, projections, MLPs) runs once over the slab, and attention keeps the chunk
    semantics exactly: chunk j (ending at ``n_j``) attends over the scope chosen for it at ``n_j``,
    as if the chunks had been fed one by one. Chunks of equal size past the plain-attention prefix
    are scored, selected and attended as one batch. With sequence groups (``part.split``) each rank
    runs the model over its own chunks only; every rank still scores every chunk against its shard.
    Decode uses it with ``c = 1`` where :func:`~dist_reattn.decode.static_reason` says why the static
    step cannot run.
    """

    def __init__(self, engine: Engine, n0: int, c: int, part: Part):
        super().__init__(engine.sliding, engine.cache_slot, engine.comm, engine.profile, part, n0)
        self.engine, self.c = engine, c

    def chunk_groups(self) -> list[tuple[int, int, int, bool]]:
        """``(offset, size, count, retrieval)`` runs of chunks that attend as one batch.

        Plain chunks (``full`` mode, or a cache of at most ``sink + local`` tokens) attend one by one
        over everything before them; the others come in runs of equal size (only the last chunk of
        a prompt can be shorter).
        """
        cfg = self.engine.scope
        groups: list[tuple[int, int, int, bool]] = []
        for off, size in self.part.chunks:
            retrieval = cfg.mode != "full" and self.n0 + off + size > cfg.sink + cfg.local
            last = groups[-1] if groups else None
            if last and retrieval and last[3] and last[1] == size:
                groups[-1] = (last[0], size, last[2] + 1, True)
            else:
                groups.append((off, size, 1, retrieval))
        return groups

    def attend_cached(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        """Appends the step's K/V to cache layer ``layer``, chooses each chunk's scope, attends.

        Args:
            q: ``[h, c_r, d]``; k, v: ``[h_kv, c_r, d]``; all un-rotated: this rank's heads (tensor
                parallelism) and this rank's tokens (sequence groups).

        Returns:
            ``[c_r, h, d]``.
        """
        e, prof, part = self.engine, self.profile, self.part
        if part.split:
            q_all, k_all, v_all = exchange.slab_qkv(e.comm, part.counts(), q, k, v)
        elif e.model.tensor_parallel:
            q_all, k_all, v_all = exchange.all_heads(e.comm, e.model.layout, q, k, v)
        else:
            q_all, k_all, v_all = q, k, v
        with prof.phase("append"):
            kt, vt = k_all.transpose(0, 1), v_all.transpose(0, 1)  # [c, Hkv, d]
            e.cache.append(layer, self.n0, kt, vt, scale_rows=e.scope.chunk)
            e.window.append(layer, self.n0, kt, vt)
        a = part.span()[0]  # this rank's first token of the step
        first, outs = 0, []
        for off, size, count, retrieval in self.chunk_groups():
            prof.count("layer_steps", count)
            b0, b1 = part.mine_in(first, count)
            first += count
            mine = slice(off + b0 * size - a, off + b1 * size - a)  # rows of q for my chunks
            n = self.n0 + off + size  # tokens in the cache at the end of the group's first chunk
            if not retrieval:
                if b1 > b0:
                    outs.append(e.attend_plain(layer, q[:, mine], q_all[:, off : off + size], n, scaling))
                continue
            per_rank = part.owners_in(first - count, count) if part.split else None
            q_chunks = q_all[:, off : off + size * count].unflatten(1, (count, size)).permute(1, 2, 0, 3)
            scope = e.scopes_for(layer, q_chunks, n, (b0, b1), per_rank)  # [b1 - b0, M]
            keys, values = e.scope_kv(layer, scope, per_rank)
            if b1 == b0:
                continue
            with prof.phase("attention"):
                cos, sin = e.rope_table(keys.shape[1])
                out = scope_attention(
                    q[:, mine].unflatten(1, (b1 - b0, size)).transpose(0, 1),  # [B, h, c, d]
                    keys.transpose(1, 2),
                    values.transpose(1, 2),
                    cos,
                    sin,
                    scaling,
                    scope.positions,
                    scope.valid,
                )
                outs.append(out.flatten(0, 1))  # [B * c, h, d]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class Engine:
    """ReAttention inference over a sharded pre-RoPE KV cache.

    Args:
        model: the adapted HF model (tensor-parallel or whole on every rank).
        scope: the scope of a sequence whose call names none (mode, sink, local, topk, span,
            recall_clip, chunk, slab).
        capacity: most tokens one sequence may hold (prompt + generated).
        limits: the widest scope any call may ask for (default: ``scope``'s); the replicated window
            and the step size are sized from it, once. ``self.scope`` is the scope in force for the
            current sequence, set by :meth:`reset` from the call's checked argument.
        comm: collectives of the sequence-sharding group; ``Comm.single()`` for one process.
        page: cache page size in tokens.
        record_selection: keep every step's scope per layer in ``self.selections`` (with sequence
            groups, the scopes of the chunks this rank attended); only steps whose ``n`` (tokens in
            the cache, the chunk included) is at least ``self.record_from`` (0: all).
        check_consensus: compare a checksum of every scope that all ranks compute across ranks;
            raise on disagreement.
        decode: how a decode token attends: ``lse`` (the static step where
            :func:`~dist_reattn.decode.static_reason` allows: each rank attends over the scope tokens
            it owns, partials merged by log-sum-exp, ``[H, d + 1]`` per rank and layer) or ``gather``
            (:class:`Step` with one token: the scope K/V assembled on every rank, as in prefill).
        graph: decode by CUDA graph replays of the static step where
            :func:`~dist_reattn.decode.graph_reason` allows; elsewhere token by token, eagerly.

    With several ranks and a model that is not tensor-parallel, a prefill slab of at least P
    chunks is split into sequence groups (:class:`~dist_reattn.exchange.Part`).
    """

    def __init__(
        self,
        model: ReAttnModel,
        scope: ScopeConfig,
        capacity: int,
        comm: Comm | None = None,
        page: int = 1,
        record_selection: bool = False,
        check_consensus: bool = False,
        decode: str = "lse",
        graph: bool = True,
        limits: ScopeLimits | None = None,
    ):
        self.limits = limits or ScopeLimits.of([scope], model.device.type)
        self.default_scope = self.limits.check(scope, model.device.type)
        if self.limits.fp8:  # an old GPU: one line, before the cache is allocated
            check_fp8_scoring(model.device)
        self.model, self.scope, self.capacity = model, self.default_scope, capacity
        self.comm = comm or Comm.single()
        s = model.spec
        # The cache keeps the layers that see every token; sliding-window layers (Gemma3's local
        # layers) keep only their own window (self.sliding, below).
        self.cache_slot = {layer: i for i, layer in enumerate(s.cache_layers)}
        self.cache = KVCache(
            len(s.cache_layers),
            s.kv_heads,
            s.head_dim,
            capacity,
            model.dtype,
            model.device,
            self.comm.rank,
            self.comm.world,
            page,
            score_norm=self.limits.score_norm,
            fp8=self.limits.fp8,
        )
        lim = self.limits
        self.max_step = lim.chunk * lim.slab
        self.window = Window(self.cache, lim.sink, lim.local, self.max_step)
        # The query and KV heads this rank attends with: all, or its tensor-parallel share.
        self.q_heads = self.kv_heads = slice(None)
        self.kv_layout = None  # every rank's (first, count) KV heads under tensor parallelism
        if model.tensor_parallel:
            q0 = sum(h for h, _ in model.layout[: self.comm.rank])
            self.q_heads = slice(q0, q0 + model.layout[self.comm.rank][0])
            starts = [sum(h for _, h in model.layout[:r]) for r in range(self.comm.world)]
            self.kv_layout = [(h0, h) for h0, (_, h) in zip(starts, model.layout, strict=True)]
            h0, h = self.kv_layout[self.comm.rank]
            self.kv_heads = slice(h0, h0 + h)
        self.sliding = None
        if s.sliding_layers:
            kv_heads = model.layout[self.comm.rank][1]
            self.sliding = SlidingLayers(
                s.sliding_layers,
                s.sliding_window,
                kv_heads,
                s.head_dim,
                lim.chunk,
                model.dtype,
                model.device,
                lambda positions: model.rope(positions, sliding=True),
            )
        if decode not in ("lse", "gather"):
            raise ValueError(f"decode={decode!r}: use lse or gather")
        self.decode_attention, self.graph = decode, graph
        self.profile = Profile(model.device)
        self.comm.profile = self.profile
        self.n = 0
        self.record_selection, self.check_consensus = record_selection, check_consensus
        self.selections: list[tuple[int, int, torch.Tensor]] = []  # (layer, n incl. chunk, scope)
        self.record_from = 0
        self.probe: Callable | None = None
        """Called as ``probe(engine, layer, q, n)`` before every retrieval's scoring (one process:
        :class:`~dist_reattn.probe.SelectionProbe`); ``q`` and ``n`` as in :meth:`scopes_for`."""
        self._cos = self._sin = None
        self._mass: torch.Tensor | None = None  # scope.select=mass: the step's fused mass so far
        self._last_scope: Scope | None = None  # the scope of the step's last retrieving layer
        self._shared_scope: Scope | None = None  # mass_shared's second pass: every layer's scope
        self._heads_file: str | None = None
        self._use(self.scope)

    def _use(self, scope: ScopeConfig) -> None:
        """Makes ``scope`` the one in force: its scoring, and its retrieval heads (the file read once)."""
        self.scope = scope
        self.scoring = Scoring.of(scope, self.rope_table, self.profile.count)
        if scope.heads != self._heads_file:
            s = self.model.spec
            # per cache layer: its retrieval heads ([H] bool) whose picks outvote the rest, or None
            self.heads = retrieval_heads(scope.heads, len(s.cache_layers), s.heads, self.model.device)
            self._heads_file = scope.heads

    def reset(self, scope: ScopeConfig | None = None) -> None:
        """Forgets the current sequence (the cache memory is kept) and starts one read with ``scope``
        (default: the engine's); a scope beyond :attr:`limits` is refused (ConfigError), never served."""
        self._use(self.default_scope if scope is None else self.limits.check(scope, self.model.device.type))
        self.n = self.window.n = 0
        self.selections.clear()
        self.profile.reset()

    def rope_table(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[m, d]`` for positions ``0..m-1``, computed once and grown by doubling."""
        if self._cos is None or self._cos.shape[0] < m:
            size = max(m, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            self._cos, self._sin = self.model.rope(torch.arange(size))
        return self._cos[:m], self._sin[:m]

    def scopes_for(
        self, layer: int, q: torch.Tensor, n: int, mine: tuple[int, int], per_rank: list[int] | None
    ) -> Scope:
        """The scopes of this rank's chunks of a run of equal chunks past the plain prefix.

        Args:
            q: ``[B, c, H, d]`` un-rotated queries of every chunk of the run, all heads; chunk b
                ends at ``n + b * c``. Every rank scores every chunk against its own shard.
            mine: this rank's chunks ``[b0, b1)`` of the run.
            per_rank: with sequence groups, how many of the run's chunks each rank attends (the
                candidates go only there); None when every rank attends every chunk.

        Returns:
            The scopes of chunks ``b0..b1-1``, tensors ``[b1 - b0, M]``.
        """
        cfg, (b0, b1) = self.scope, mine
        B, c = q.shape[:2]
        if self._shared_scope is not None:  # mass_shared's second pass: one scope for every layer
            scope = self._shared_scope
            if self.check_consensus or self.record_selection:
                self.check_and_record(layer, n, scope.row(0), True)
            return scope
        candidates = None
        if retrieves(cfg):
            if self.probe is not None:
                self.probe(self, layer, q, n)
            with self.profile.phase("scoring"):
                if fuses_mass(cfg, c):  # B = 1; the mass of the step's earlier layers is kept in self._mass
                    acc = None if layer == 0 else self._mass
                    scores, index, self._mass = mass_candidates(
                        q[0, 0], self.cache, layer, n, cfg, self.comm, acc
                    )
                else:
                    ends = [n + b * c for b in range(B)]
                    scores, index = score_chunks(q, self.cache, layer, ends, cfg, self.scoring)
            candidates = exchange.route_candidates(self.comm, per_rank, scores, index)  # [P, B_mine, c, H, k]
        with self.profile.phase("selection"):
            scope = select_scope(cfg, n + b0 * c, c, b1 - b0, candidates, q.device, self.heads[layer])
        if self.check_consensus or self.record_selection:
            for b in range(b1 - b0):
                self.check_and_record(layer, n + (b0 + b) * c, scope.row(b), per_rank is None)
        self._last_scope = scope
        return scope

    def check_and_record(self, layer: int, n: int, scope: Scope, shared: bool) -> None:
        """The debug options: cross-rank agreement on a scope every rank computed, and its record."""
        if self.check_consensus and shared:
            chosen = scope.selected()
            self.comm.check_same(
                [chosen.numel(), int(chosen.sum()), int((chosen * chosen).sum())],
                f"the scope of layer {layer} at n={n}",
            )
        if self.record_selection and n >= self.record_from:
            self.selections.append((layer, n, scope.selected().cpu()))

    def scope_kv(
        self, layer: int, scope: Scope, per_rank: list[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[B, M, h_kv, d]`` (pre-RoPE, this rank's KV heads) of scopes ``[B, M]`` laid out as
        ``[sink ; selected ; local]``: the sink and local tokens from the replicated window, the
        selected ones from their owners (every rank takes part in that exchange, even with B = 0).

        Args:
            per_rank: with sequence groups, how many of the run's chunks each rank attends (the
                exchange pads every rank's lists to the largest); None when every rank attends all.
        """
        cfg, w = self.scope, self.window
        B, M = scope.tokens.shape
        t = M - cfg.sink - cfg.local  # selected entries (0 in streaming)
        with self.profile.phase("kv_fetch"):
            sk, sv = w.read_sink(layer, cfg.sink)
            lk, lv = w.read(layer, scope.tokens[:, M - cfg.local :])
            parts_k = [sk[None, :, self.kv_heads].expand(B, -1, -1, -1)]
            parts_v = [sv[None, :, self.kv_heads].expand(B, -1, -1, -1)]
            if t:
                sel = scope.tokens[:, cfg.sink : cfg.sink + t]
                lists = torch.where(scope.valid[:, cfg.sink : cfg.sink + t], sel, -1)
                width = B if per_rank is None else max(per_rank)
                if width > B:
                    lists = torch.cat([lists, lists.new_full((width - B, t), -1)])
                runs = cfg.recall_clip
                fk, fv = exchange.fetch_rows(
                    self.comm,
                    self.cache,
                    layer,
                    lists,
                    capacity=exchange.fetch_capacity(t, runs, self.cache.page, self.comm.world),
                    gathered=per_rank is not None,
                    heads=self.kv_layout,
                )
                parts_k.append(fk[:B])
                parts_v.append(fv[:B])
            parts_k.append(lk[..., self.kv_heads, :])
            parts_v.append(lv[..., self.kv_heads, :])
            return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)

    def attend_plain(
        self, layer: int, q: torch.Tensor, q_all: torch.Tensor, n: int, scaling: float
    ) -> torch.Tensor:
        """One chunk over everything in the cache (``n`` tokens) at original positions.

        Args:
            q: ``[h, c, d]`` this rank's un-rotated queries; q_all: ``[H, c, d]`` of every head.

        Returns:
            ``[c, h, d]``.
        """
        if q.shape[1] == 1 and self.comm.world > 1 and self.decode_attention == "lse":
            with self.profile.phase("attention"):
                out = attend_all(self.cache, self.comm, layer, q_all[:, 0], *self.rope_table(n), scaling)
            return out[self.q_heads][None].to(q.dtype)
        w, dev = self.window, q.device
        with self.profile.phase("kv_fetch"):
            lo = w.lo  # the same on every rank: tokens before it come from their owners
            keys, values = w.read(layer, torch.arange(lo, n, device=dev))
            keys, values = keys[:, self.kv_heads], values[:, self.kv_heads]
            if lo > 0:
                lists = torch.arange(lo, device=dev)[None]
                cap = exchange.fetch_capacity(lo, 1, self.cache.page, self.comm.world)
                fk, fv = exchange.fetch_rows(
                    self.comm, self.cache, layer, lists, capacity=cap, gathered=False, heads=self.kv_layout
                )
                keys, values = torch.cat([fk[0], keys]), torch.cat([fv[0], values])
        with self.profile.phase("attention"):
            cos, sin = self.rope_table(n)
            out = scope_attention(
                q[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], cos, sin, scaling
            )
            return out[0]

    def step(self, ids: torch.Tensor, stage: str = "prefill") -> torch.Tensor:
        """Feeds ``ids [c]`` at the end of the sequence; returns the last token's logits.

        Args:
            stage: the profile stage this step's time counts under (``prefill`` or ``decode``).
        """
        c = ids.shape[0]
        self._check_room(c)
        comm = self.comm
        part = Part.of_step(c, self.scope.chunk, comm.rank, comm.world, self.splits_steps())
        if comm.world > 1 and c > self.max_step:  # the replicated window holds one step's tokens
            raise RuntimeError(
                f"a step of {c} tokens > the limits' chunk x slab = {self.max_step} with several ranks"
            )
        self.profile.begin(stage)
        a, b = part.span()
        shared = self.scope.select == "mass_shared" and fuses_mass(self.scope, c)
        saved = self.sliding.state() if shared and self.sliding is not None else None
        self._last_scope = None
        logits = self.model.forward(ids[a:b], Step(self, self.n, c, part))
        if shared and self._last_scope is not None:
            # Second pass: every layer attends the scope of the first pass's last retrieving layer,
            # chosen by the mass of all of them; the token's K/V are written again at the same rows.
            if saved is not None:
                self.sliding.restore(saved)
            self._shared_scope = self._last_scope
            try:
                logits = self.model.forward(ids[a:b], Step(self, self.n, c, part))
            finally:
                self._shared_scope = None
        if part.split:  # the prompt's last token ran on the last chunk's rank
            logits = comm.broadcast(logits, part.owner[-1], "logits")
        self.profile.end(c)
        self.n += c
        return logits

    def _check_room(self, c: int) -> None:
        if (n := self.n + c) > self.capacity:
            raise RuntimeError(f"sequence of {n} tokens exceeds the engine's capacity {self.capacity}")

    def view(self) -> EngineView:
        """What decode reads of this engine, for the sequence in the cache now."""
        debug = self.record_selection or self.check_consensus
        return EngineView(
            self.model,
            self.cache,
            self.window,
            self.comm,
            self.sliding,
            self.cache_slot,
            self.q_heads,
            self.scope,
            self.scoring,
            self.heads,
            self.rope_table,
            self.profile,
            self.check_and_record if debug else None,
            self.decode_attention,
            self.n,
            self.capacity,
        )

    def decode_step(self, token: int, stage: str = "decode") -> torch.Tensor:
        """Feeds one generated token; returns its logits. The static step (what a CUDA graph replays)
        run eagerly, or the prefill's :class:`Step` where :func:`~dist_reattn.decode.static_reason`
        says why not."""
        view = self.view()
        if static_reason(view) is not None:
            return self.step(torch.tensor([token]), stage)
        self._check_room(1)
        self.profile.begin(stage)
        step = StaticStep(view, torch.tensor([self.n], device=self.model.device))
        logits = step.forward(torch.tensor([token]))
        self.profile.end(1)
        self.n = self.window.n = self.n + 1
        return logits

    def splits_steps(self) -> bool:
        """Whether steps of several chunks are split into sequence groups: several ranks, a model
        that is whole on every rank (not tensor-parallel), and a mode with a bounded scope (``full``
        attends over everything and runs every chunk on every rank)."""
        return self.comm.world > 1 and not self.model.tensor_parallel and self.scope.mode != "full"

    def prefill(self, ids: torch.Tensor, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """Feeds the prompt ``ids [n]`` in chunks of ``scope.chunk``, ``scope.slab`` chunks per forward;
        returns the last token's logits.

        Args:
            on_chunk: called with the number of tokens of each finished forward (progress bars).
        """
        logits = None
        slab = self.scope.chunk * self.scope.slab_on(self.model.device.type)
        # scope.select=mass selects at steps of one token: the prompt's last token is fed alone
        alone = fuses_mass(self.scope, 1) and ids.shape[0] > 1
        body = ids[:-1] if alone else ids
        pieces = [body[c0 : c0 + slab] for c0 in range(0, body.shape[0], slab)] + (
            [ids[-1:]] if alone else []
        )
        for piece in pieces:
            logits = self.step(piece)
            if on_chunk:
                on_chunk(piece.shape[0])
        return logits

    def generate(
        self,
        ids: torch.Tensor | list[int],
        max_new_tokens: int,
        on_chunk: Callable[[int], None] | None = None,
        scope: ScopeConfig | None = None,
    ) -> Generation:
        """Greedy generation after a chunked prefill; stops at EOS or ``max_new_tokens``.

        Args:
            scope: this sequence's scope (default: the engine's), within :attr:`limits`.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.reset(scope)
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.prefill(ids, on_chunk)
        sync()
        t1 = time.perf_counter()
        d = self.decode(int(logits.argmax()), max_new_tokens)
        return Generation(
            d.tokens,
            ids.shape[0],
            t1 - t0,
            d.seconds,
            self.profile.as_dict(),
            decode_tokens=d.steps,
            decode_warmup_seconds=d.warmup_seconds,
            decode_graph=d.graph,
        )

    def decode(self, first: int, max_new_tokens: int) -> Decoded:
        """Greedy tokens after the sequence in the cache, ``first`` (the last logits' argmax) first,
        until EOS or ``max_new_tokens`` in all: CUDA graph replays of the static step where
        :func:`~dist_reattn.decode.graph_reason` allows (and ``graph``), else one :meth:`decode_step` each."""
        eos = self.model.eos_ids
        if self.graph and max_new_tokens > 1 and first not in eos and graph_reason(self.view()) is None:
            d = GreedyDecoder(self.view()).run(first, max_new_tokens, eos)
            self.n = self.window.n = self.n + d.fed
            self.profile.add(
                "decode_warmup", "graph", d.warmup_seconds, tokens=d.warmup_steps, steps=d.warmup_steps
            )
            self.profile.add("decode", "graph", d.seconds, tokens=d.steps, steps=d.steps)
            return d
        return self._decode_steps([first], max_new_tokens)

    def _decode_steps(self, out: list[int], max_new_tokens: int) -> Decoded:
        """Greedy steps one by one; the first step (the c = 1 kernels compile there) is the warm-up."""
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        warm = None  # when the first step ended
        while out[-1] not in self.model.eos_ids and len(out) < max_new_tokens:
            if len(out) == 2:
                sync()
                warm = time.perf_counter()
            out.append(
                int(self.decode_step(out[-1], "decode_warmup" if len(out) == 1 else "decode").argmax())
            )
        sync()
        t1 = time.perf_counter()
        warm = t1 if warm is None else warm
        return Decoded(out, warm - t0, min(len(out) - 1, 1), t1 - warm, max(len(out) - 2, 0), False)
