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

from .attention import scope_attention
from .cache import KVCache
from .config import ScopeConfig
from .distributed import Comm
from .models.adapter import ReAttnModel
from .select import local_topk, select_from_candidates


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (EOS included when reached)."""
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)


class Step:
    """One forward of ``c`` new tokens at global positions ``[n0, n0 + c)``."""

    def __init__(self, engine: Engine, n0: int, c: int):
        self.engine, self.n0, self.c = engine, n0, c

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """Appends the chunk's K/V, chooses the scope, attends.

        Args:
            q: ``[H, c, d]``; k, v: ``[Hkv, c, d]``; all un-rotated.

        Returns:
            ``[c, H, d]``.
        """
        e = self.engine
        n = self.n0 + self.c
        e.cache.append(layer, self.n0, k.transpose(0, 1), v.transpose(0, 1))
        scope = e.scope_for(layer, q.transpose(0, 1), n)
        if scope is None:
            # Everything in the cache, original positions 0..n-1 (P = 1: local rows are global).
            keys, values = e.cache.k[layer, :n], e.cache.v[layer, :n]
        else:
            keys, values = e.gather(layer, scope)
        m = keys.shape[0]
        cos, sin = e.rope_table(m)
        return scope_attention(
            q, keys.transpose(0, 1), values.transpose(0, 1), cos, sin, scaling or q.shape[-1] ** -0.5
        )


class Engine:
    """ReAttention inference over a sharded pre-RoPE KV cache.

    Args:
        model: the adapted HF model.
        scope: the scope section of the config (mode, sink, local, topk, span, recall_clip, chunk).
        capacity: most tokens one sequence may hold (prompt + generated).
        comm: collectives of the sequence-sharding group; ``Comm.single()`` for one process.
        page: cache page size in tokens.
        record_selection: keep every step's scope per layer in ``self.selections``.
    """

    def __init__(
        self,
        model: ReAttnModel,
        scope: ScopeConfig,
        capacity: int,
        comm: Comm | None = None,
        page: int = 256,
        record_selection: bool = False,
    ):
        scope.validate()
        self.model, self.scope, self.capacity = model, scope, capacity
        self.comm = comm or Comm.single()
        if self.comm.world != 1:
            raise NotImplementedError("sequence sharding over several ranks is not wired into the engine yet")
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
        self.n = 0
        self.record_selection = record_selection
        self.selections: list[tuple[int, int, torch.Tensor]] = []  # (layer, n incl. chunk, scope)
        self._cos = self._sin = None

    def reset(self) -> None:
        """Forgets the current sequence (the cache memory is kept)."""
        self.n = 0
        self.selections.clear()

    def rope_table(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[m, d]`` for positions ``0..m-1``, computed once and grown by doubling."""
        if self._cos is None or self._cos.shape[0] < m:
            size = max(m, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            self._cos, self._sin = self.model.rope(torch.arange(size))
        return self._cos[:m], self._sin[:m]

    def scope_for(self, layer: int, q: torch.Tensor, n: int) -> torch.Tensor | None:
        """The scope of this step (global token indices), or None for everything at original positions.

        Args:
            q: ``[c, H, d]`` un-rotated queries of all heads.
            n: tokens in the cache including the chunk.
        """
        cfg = self.scope
        if cfg.mode == "full" or n <= cfg.sink + cfg.local:
            return None
        if cfg.mode == "streaming" or cfg.topk == 0:
            scope = torch.cat([torch.arange(cfg.sink), torch.arange(n - cfg.local, n)]).to(q.device)
        else:
            lo, hi = self.cache.local_rows(cfg.sink, n - cfg.local)
            scores, rows = local_topk(q, self.cache.k[layer], lo, hi, cfg.topk)
            index = self.cache.to_global(rows)
            scope = select_from_candidates(
                self.comm.all_gather(scores, "topk_candidates"),
                self.comm.all_gather(index, "topk_candidates"),
                n,
                cfg,
            )
        if self.record_selection:
            self.selections.append((layer, n, scope.cpu()))
        return scope

    def gather(self, layer: int, scope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scope K/V ``[m, Hkv, d]`` (pre-RoPE) in scope order."""
        rows = self.cache.to_local(scope)
        return self.cache.k[layer, rows], self.cache.v[layer, rows]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feeds ``ids [c]`` at the end of the sequence; returns the last token's logits."""
        c = ids.shape[0]
        if self.n + c > self.capacity:
            raise RuntimeError(
                f"sequence of {self.n + c} tokens exceeds the engine's capacity {self.capacity}"
            )
        logits = self.model.forward(ids, Step(self, self.n, c))
        self.n += c
        return logits

    def prefill(self, ids: torch.Tensor, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """Feeds the prompt ``ids [n]`` in chunks of ``scope.chunk``; returns the last token's logits.

        Args:
            on_chunk: called with the number of tokens of each finished chunk (progress bars).
        """
        logits = None
        for c0 in range(0, ids.shape[0], self.scope.chunk):
            chunk = ids[c0 : c0 + self.scope.chunk]
            logits = self.step(chunk)
            if on_chunk:
                on_chunk(chunk.shape[0])
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
            logits = self.step(torch.tensor([token]))
        sync()
        return Generation(out, ids.shape[0], t1 - t0, time.perf_counter() - t1)
