"""Chunked prefill, greedy decode and generation in the modes reattention / streaming / full.

One :class:`Engine` owns the preallocated KV cache for up to ``capacity`` tokens and runs one
sequence at a time (``reset`` between sequences). Each forward of a chunk is one :class:`Step`: the
model's attention layers call ``Step.attend`` with their un-rotated q, k, v.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import merge_partials, partial_attention, scope_attention
from .cache import KVCache
from .config import ScopeConfig
from .distributed import Comm
from .models.adapter import ReAttnModel
from .profile import Profile
from .select import Scope, local_topk, select_from_candidates


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (EOS included when reached)."""
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    profile: dict
    """Per-stage, per-phase seconds and counters (:meth:`Profile.as_dict`)."""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)


class Step:
    """One forward of ``c`` new tokens at global positions ``[n0, n0 + c)``.

    In prefill a step is a slab of one or more chunks of ``scope.chunk`` tokens: the model's
    per-token work (norms, projections, MLPs) runs once over the slab, and attention keeps the chunk
    semantics exactly: chunk j (ending at ``n_j``) attends over the scope chosen for it at ``n_j``,
    as if the chunks had been fed one by one. Chunks of equal size past the plain-attention prefix
    are scored, selected and attended as one batch.
    """

    def __init__(self, engine: Engine, n0: int, c: int):
        self.engine, self.n0, self.c = engine, n0, c

    def chunk_groups(self) -> list[tuple[int, int, int, bool]]:
        """``(offset, size, count, retrieval)`` runs of chunks that attend as one batch.

        Plain chunks (``full`` mode, or a cache of at most ``sink + local`` tokens) attend one by one
        over everything before them; the others come in runs of equal size (only the last chunk of
        a prompt can be shorter).
        """
        cfg = self.engine.scope
        groups: list[tuple[int, int, int, bool]] = []
        for off in range(0, self.c, cfg.chunk):
            size = min(cfg.chunk, self.c - off)
            retrieval = cfg.mode != "full" and self.n0 + off + size > cfg.sink + cfg.local
            last = groups[-1] if groups else None
            if last and retrieval and last[3] and last[1] == size:
                groups[-1] = (last[0], size, last[2] + 1, True)
            else:
                groups.append((off, size, 1, retrieval))
        return groups

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """Appends the step's K/V, chooses each chunk's scope, attends.

        Args:
            q: ``[H, c, d]``; k, v: ``[Hkv, c, d]``; all un-rotated (this rank's heads).

        Returns:
            ``[c, H, d]`` for this rank's heads.
        """
        e, prof = self.engine, self.engine.profile
        scaling = scaling or q.shape[-1] ** -0.5
        q_all, k_all, v_all = e.all_heads(q, k, v)
        with prof.phase("append"):
            e.cache.append(layer, self.n0, k_all.transpose(0, 1), v_all.transpose(0, 1))
        outs = []
        for off, size, count, retrieval in self.chunk_groups():
            prof.count("layer_steps", count)
            rows = slice(off, off + size * count)
            n = self.n0 + off + size  # tokens in the cache at the end of the group's first chunk
            if not retrieval:
                outs.append(e.attend_plain(layer, q[:, rows], q_all[:, rows], n, scaling))
                continue
            q_chunks = q_all[:, rows].unflatten(1, (count, size)).permute(1, 2, 0, 3)  # [B, c, H, d]
            scope = e.scopes_for(layer, q_chunks, n)
            if self.c == 1 and e.comm.world > 1 and e.decode == "lse":
                return e.attend_partials(layer, q_all[:, 0], scope.row(0), n, scaling)
            keys, values = e.gather(layer, scope.tokens)  # [B, M, Hkv, d]
            with prof.phase("attention"):
                cos, sin = e.rope_table(keys.shape[1])
                out = scope_attention(
                    q[:, rows].unflatten(1, (count, size)).transpose(0, 1),  # [B, h, c, d]
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
        model: the adapted HF model.
        scope: the scope section of the config (mode, sink, local, topk, span, recall_clip, chunk).
        capacity: most tokens one sequence may hold (prompt + generated).
        comm: collectives of the sequence-sharding group; ``Comm.single()`` for one process.
        page: cache page size in tokens.
        record_selection: keep every step's scope per layer in ``self.selections``.
        check_consensus: compare a checksum of every step's scope across ranks; raise on disagreement.
        decode: with several ranks, how a decode step attends: ``lse`` (each rank attends over the
            scope tokens it owns, partial outputs merged by log-sum-exp: moves ``[H, d + 1]`` per rank
            and layer) or ``gather`` (the scope K/V is assembled on every rank, as in prefill).
    """

    def __init__(
        self,
        model: ReAttnModel,
        scope: ScopeConfig,
        capacity: int,
        comm: Comm | None = None,
        page: int = 256,
        record_selection: bool = False,
        check_consensus: bool = False,
        decode: str = "lse",
    ):
        scope.validate()
        self.model, self.scope, self.capacity = model, scope, capacity
        self.comm = comm or Comm.single()
        s = model.spec
        self.cache = KVCache(
            s.layers,
            s.kv_heads,
            s.head_dim,
            capacity,
            model.dtype,
            model.device,
            self.comm.rank,
            self.comm.world,
            page,
        )
        # The query heads this rank attends with: all, or its tensor-parallel share (its KV heads
        # arrive already sliced from `gather`).
        self.q_heads = slice(None)
        if model.tensor_parallel:
            q0 = sum(h for h, _ in model.layout[: self.comm.rank])
            self.q_heads = slice(q0, q0 + model.layout[self.comm.rank][0])
        if decode not in ("lse", "gather"):
            raise ValueError(f"decode={decode!r}: use lse or gather")
        self.decode = decode
        self.profile = Profile(model.device)
        self.comm.profile = self.profile
        self.n = 0
        self.record_selection, self.check_consensus = record_selection, check_consensus
        self.selections: list[tuple[int, int, torch.Tensor]] = []  # (layer, n incl. chunk, scope)
        self._cos = self._sin = None

    def reset(self) -> None:
        """Forgets the current sequence (the cache memory is kept)."""
        self.n = 0
        self.selections.clear()
        self.profile.reset()

    def rope_table(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[m, d]`` for positions ``0..m-1``, computed once and grown by doubling."""
        if self._cos is None or self._cos.shape[0] < m:
            size = max(m, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            self._cos, self._sin = self.model.rope(torch.arange(size))
        return self._cos[:m], self._sin[:m]

    def scopes_for(self, layer: int, q: torch.Tensor, n: int) -> Scope:
        """The scopes of a batch of equal chunks past the plain prefix (``n > sink + local``).

        Args:
            q: ``[B, c, H, d]`` un-rotated queries of all heads; chunk b ends at ``n + b * c``.
            n: tokens in the cache at the end of the first chunk.

        Returns:
            The batch of scopes, tensors ``[B, M]``.
        """
        cfg = self.scope
        B, c = q.shape[:2]
        ends = [n + b * c for b in range(B)]
        dev = q.device
        if cfg.mode == "streaming" or cfg.topk == 0:
            local = torch.arange(B, device=dev)[:, None] * c + torch.arange(n - cfg.local, n, device=dev)
            scope = Scope(torch.cat([torch.arange(cfg.sink, device=dev).expand(B, -1), local], dim=1))
        else:
            with self.profile.phase("scoring"):
                found = []
                for b, end in enumerate(ends):
                    lo, hi = self.cache.local_rows(cfg.sink, end - cfg.local)
                    found.append(local_topk(q[b], self.cache.k[layer], lo, hi, cfg.topk))
                scores = torch.stack([f[0] for f in found])  # [B, c, H, k]
                index = self.cache.to_global(torch.stack([f[1] for f in found]))
            if self.comm.world == 1:
                scores, index = scores[None], index[None]  # [P = 1, B, c, H, k]
            else:
                # One collective for both halves: fp32 scores and indices (< 2**53) are exact in fp64.
                both = self.comm.all_gather(torch.stack([scores.double(), index.double()]), "topk_candidates")
                scores, index = both[:, 0].float(), both[:, 1].long()
            with self.profile.phase("selection"):
                n_b = n if B == 1 else n + c * torch.arange(B, device=dev)
                scope = select_from_candidates(scores, index, n_b, cfg)
        for b, end in enumerate(ends):
            if self.check_consensus or self.record_selection:
                self.check_and_record(layer, end, scope.row(b))
        return scope

    def check_and_record(self, layer: int, n: int, scope: Scope) -> None:
        """The debug options: cross-rank agreement on a chunk's scope, and its record."""
        if self.check_consensus:
            chosen = scope.selected()
            self.comm.check_same(
                [chosen.numel(), int(chosen.sum()), int((chosen * chosen).sum())],
                f"the scope of layer {layer} at n={n}",
            )
        if self.record_selection:
            self.selections.append((layer, n, scope.selected().cpu()))

    def attend_plain(
        self, layer: int, q: torch.Tensor, q_all: torch.Tensor, n: int, scaling: float
    ) -> torch.Tensor:
        """One chunk over everything in the cache (``n`` tokens) at original positions.

        Args:
            q: ``[h, c, d]`` this rank's un-rotated queries; q_all: ``[H, c, d]`` of every head.

        Returns:
            ``[c, h, d]``.
        """
        if q.shape[1] == 1 and self.comm.world > 1 and self.decode == "lse":
            return self.attend_partials(layer, q_all[:, 0], None, n, scaling)
        if self.comm.world == 1:
            # Everything in the cache at original positions 0..n-1; with one rank local rows are global.
            keys, values = self.cache.k[layer, :n], self.cache.v[layer, :n]
        else:
            keys, values = self.gather(layer, torch.arange(n, device=q.device))
        with self.profile.phase("attention"):
            cos, sin = self.rope_table(n)
            out = scope_attention(
                q[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], cos, sin, scaling
            )
            return out[0]

    def all_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v of every head: this rank's ``[h, c, d]`` pieces gathered in one collective.

        Under tensor parallelism each rank computes only its heads (uneven counts are padded to the
        widest rank); scoring needs every query head and the cache keeps every KV head.
        """
        if not self.model.tensor_parallel:
            return q, k, v
        layout = self.model.layout
        width = max(hq + 2 * hkv for hq, hkv in layout)
        x = torch.cat([q, k, v])  # [hq + 2 hkv, c, d]
        if x.shape[0] < width:
            x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
        every = self.comm.all_gather(x, "qkv_heads")  # [P, width, c, d]
        qs = [every[r, :hq] for r, (hq, _) in enumerate(layout)]
        ks = [every[r, hq : hq + hkv] for r, (hq, hkv) in enumerate(layout)]
        vs = [every[r, hq + hkv : hq + 2 * hkv] for r, (hq, hkv) in enumerate(layout)]
        return torch.cat(qs), torch.cat(ks), torch.cat(vs)

    def gather(self, layer: int, scope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[..., m, h_kv, d]`` (pre-RoPE) of global tokens ``scope [..., m]`` for this rank's KV
        heads, fetched from the ranks that own the tokens.

        Each rank fills the rows it owns and a sum over ranks assembles the scope (every row has
        exactly one owner, the others add zeros, so the sum is exact in any dtype). Under tensor
        parallelism each rank needs only its own KV heads: the buffer is laid out by receiving rank
        and reduce-scattered, so every rank receives just its heads (a reduce-scatter moves half the
        bytes of an all-reduce of the same buffer). Without it every rank attends with every head:
        an all-reduce.
        """
        cache, comm = self.cache, self.comm
        with self.profile.phase("kv_fetch"):
            if comm.world == 1:
                rows = cache.to_local(scope)
                return cache.k[layer, rows], cache.v[layer, rows]
            mine = cache.owned_mask(scope).nonzero(as_tuple=True)  # one host sync, reused below
            rows = cache.to_local(scope[mine])
            k, v = cache.k[layer, rows], cache.v[layer, rows]  # [owned, Hkv, d]
            if not self.model.tensor_parallel:
                kv = cache.k.new_zeros((2, *scope.shape, *cache.k.shape[2:]))  # [2, ..., m, Hkv, d]
                kv[0][mine], kv[1][mine] = k, v
            else:
                layout = self.model.layout
                width = max(h for _, h in layout)
                kv = cache.k.new_zeros((comm.world, 2, *scope.shape, width, cache.k.shape[3]))
                h0 = 0
                for r, (_, h) in enumerate(layout):  # rank r's KV heads, padded to the widest rank
                    heads = (*mine, slice(0, h))
                    kv[r, 0][heads], kv[r, 1][heads] = k[:, h0 : h0 + h], v[:, h0 : h0 + h]
                    h0 += h
        if not self.model.tensor_parallel:
            kv = comm.all_reduce(kv, "scope_kv")
            return kv[0], kv[1]
        kv = comm.reduce_scatter(kv, "scope_kv")[..., : layout[comm.rank][1], :]  # [2, ..., m, h_kv, d]
        return kv[0], kv[1]

    def attend_partials(
        self, layer: int, q: torch.Tensor, scope: Scope | None, n: int, scaling: float
    ) -> torch.Tensor:
        """Decode attention split by token owner: each rank attends over its scope tokens, merged by LSE.

        Args:
            q: ``[H, d]`` un-rotated query of all heads (one token).
            scope: this step's scope, or None for all ``n`` tokens at their own positions.

        Returns:
            ``[1, h, d]`` for this rank's query heads, in the model dtype.
        """
        cache = self.cache
        with self.profile.phase("attention"):
            if scope is None:
                scope = Scope(torch.arange(n, device=q.device))
            tokens, m = scope.tokens, scope.tokens.numel()
            mine = cache.owned_mask(tokens)
            if scope.valid is not None:
                mine &= scope.valid
            positions = torch.arange(m, device=q.device) if scope.positions is None else scope.positions
            q_position, positions = positions[-1], positions[mine]  # the query is the scope's last token
            rows = cache.to_local(tokens[mine])
            cos, sin = self.rope_table(m)
            out, lse = partial_attention(
                q,
                cache.k[layer, rows].transpose(0, 1),
                cache.v[layer, rows].transpose(0, 1),
                cos[positions],
                sin[positions],
                cos[q_position],
                sin[q_position],
                scaling,
            )
            packed = torch.cat([out, lse[:, None]], dim=1)  # [H, d + 1] fp32
        every = self.comm.all_gather(packed, "decode_partials")  # [P, H, d + 1]
        with self.profile.phase("attention"):
            merged = merge_partials(every[..., :-1], every[..., -1])  # [H, d]
            return merged[self.q_heads][None].to(q.dtype)

    def step(self, ids: torch.Tensor, stage: str = "prefill") -> torch.Tensor:
        """Feeds ``ids [c]`` at the end of the sequence; returns the last token's logits.

        Args:
            stage: the profile stage this step's time counts under (``prefill`` or ``decode``).
        """
        c = ids.shape[0]
        if self.n + c > self.capacity:
            raise RuntimeError(
                f"sequence of {self.n + c} tokens exceeds the engine's capacity {self.capacity}"
            )
        self.profile.begin(stage)
        logits = self.model.forward(ids, Step(self, self.n, c))
        self.profile.end(c)
        self.n += c
        return logits

    def prefill(self, ids: torch.Tensor, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """Feeds the prompt ``ids [n]`` in chunks of ``scope.chunk``, ``scope.slab`` chunks per forward;
        returns the last token's logits.

        Args:
            on_chunk: called with the number of tokens of each finished forward (progress bars).
        """
        logits = None
        slab = self.scope.chunk * self.scope.slab_on(self.model.device.type)
        for c0 in range(0, ids.shape[0], slab):
            piece = ids[c0 : c0 + slab]
            logits = self.step(piece)
            if on_chunk:
                on_chunk(piece.shape[0])
        return logits

    def generate(
        self,
        ids: torch.Tensor | list[int],
        max_new_tokens: int,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy generation after a chunked prefill; stops at EOS or ``max_new_tokens``."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        self.reset()
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.prefill(ids, on_chunk)
        sync()
        t1 = time.perf_counter()
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(logits.argmax())
            out.append(token)
            if token in self.model.eos_ids or len(out) == max_new_tokens:
                break
            logits = self.step(torch.tensor([token]), stage="decode")
        sync()
        return Generation(out, ids.shape[0], t1 - t0, time.perf_counter() - t1, self.profile.as_dict())
