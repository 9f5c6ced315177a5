"""The sequence-sharded pre-RoPE KV cache, and the replicated window of recent tokens.

Tokens are grouped in pages of ``page`` tokens; page ``p`` lives on rank ``p mod P`` (striped), so
every shard grows at the same rate during prefill. A rank stores its tokens in global order, so
any global range ``[lo, hi)`` is one contiguous range of its local rows. With P = 1 local row and
global index coincide. The default page is one token: a contiguous run of ``L`` tokens then has at
most ``ceil(L / P)`` tokens on any rank, which bounds the rows an owner sends for a scope
(:func:`dist_reattn.exchange.fetch_capacity`).

The memory plan made before anything is allocated lives in :mod:`dist_reattn.plan`.
"""

from __future__ import annotations

import math

import torch

from .kernels import key_center, key_scale, quantize_keys


class KVCache:
    """This rank's share of every layer's pre-RoPE keys and values, preallocated once.

    Shapes: ``k``, ``v`` are ``[layers, local_capacity, Hkv, d]``. With ``score_norm`` (1 or 2) the
    cache also keeps ``score_k``, the same shape: each key times the L1 / L2 norm of its value, what
    the ``qkv`` / ``qkv2`` selections score (``scope.select``); otherwise ``score_k`` is ``k``.
    With ``fp8`` (``scope.scoring=fp8``) it also keeps ``k8`` ``[layers, local_capacity, Hkv, d]``
    ``float8_e4m3fn``, the score keys minus their per-channel centre, quantized
    (:func:`~dist_reattn.kernels.quantize_keys`), with ``k_center`` and ``k_scale`` ``[layers, Hkv, d]``
    fp32, one centre and one scale per layer and sequence, set at the sequence's first append
    (``pos`` 0) from its first keys (:meth:`append`).
    """

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        page: int = 1,
        score_norm: int = 0,
        fp8: bool = False,
    ):
        assert 0 <= rank < world and page > 0 and capacity > 0 and score_norm in (0, 1, 2)
        self.rank, self.world, self.page, self.capacity = rank, world, page, capacity
        self.local_capacity = local_capacity(capacity, world, page, rank)
        shape = (layers, self.local_capacity, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.score_norm = score_norm
        self.score_k = torch.empty(shape, dtype=dtype, device=device) if score_norm else self.k
        self.k8 = self.k_scale = self.k_center = None
        if fp8:
            self.k8 = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
            self.k_scale = torch.ones((layers, kv_heads, head_dim), dtype=torch.float32, device=device)
            self.k_center = torch.zeros((layers, kv_heads, head_dim), dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        fp8 = 0 if self.k8 is None else self.k8.nbytes + self.k_scale.nbytes + self.k_center.nbytes
        return self.k.numel() * self.k.element_size() * (3 if self.score_norm else 2) + fp8

    def local_count(self, g: int) -> int:
        """How many of this rank's tokens have a global index below ``g``."""
        full_pages, tail = divmod(g, self.page)
        owned = max(0, (full_pages - self.rank + self.world - 1) // self.world)
        return owned * self.page + (tail if full_pages % self.world == self.rank else 0)

    def local_rows(self, lo: int, hi: int) -> tuple[int, int]:
        """Local rows holding this rank's tokens of the global range ``[lo, hi)``."""
        return self.local_count(lo), self.local_count(hi)

    def to_global(self, rows: torch.Tensor) -> torch.Tensor:
        """Maps local rows to global token indices; negative rows (padding) stay -1."""
        if self.world == 1:
            return rows
        page_local, off = rows // self.page, rows % self.page
        g = (page_local * self.world + self.rank) * self.page + off
        return torch.where(rows >= 0, g, rows.new_full((), -1))

    def owner_of(self, g: torch.Tensor) -> torch.Tensor:
        """The rank that stores global index ``g``."""
        return owner_of(g, self.page, self.world)

    def owned_mask(self, g: torch.Tensor) -> torch.Tensor:
        """True where global index ``g`` lives on this rank."""
        return self.owner_of(g) == self.rank

    def to_local(self, g: torch.Tensor) -> torch.Tensor:
        """Local rows of global indices owned by this rank."""
        return to_local(g, self.page, self.world)

    def local_count_at(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`local_count` of a tensor of global indices ``g >= 0``, computed on their device."""
        full, tail = g // self.page, g % self.page
        owned = (full - self.rank + self.world - 1) // self.world
        return owned * self.page + torch.where(full % self.world == self.rank, tail, 0)

    def append_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores token ``pos`` (``[1]``, a device index: nothing read on the host) if this rank owns it.

        Args:
            k, v: ``[1, Hkv, d]``.
        """
        row = self.to_local(pos).clamp(max=self.local_capacity - 1)  # another rank's token: any row
        mine = self.owned_mask(pos)[:, None, None]
        sk = score_keys(k, v, self.score_norm) if self.score_norm else k
        pairs = [(self.k[layer], k), (self.v[layer], v)]
        if self.score_norm:
            pairs.append((self.score_k[layer], sk))
        if self.k8 is not None:  # as bytes: index_copy_ has no float8 kernel on a CPU
            k8 = quantize_keys(sk, self.k_scale[layer], center=self.k_center[layer]).view(torch.uint8)
            pairs.append((self.k8[layer].view(torch.uint8), k8))
        for cache, new in pairs:
            cache.index_copy_(0, row, torch.where(mine, new, cache[row]))  # unchanged unless mine

    def append(
        self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, scale_rows: int | None = None
    ) -> None:
        """Stores the tokens ``[pos, pos + c)`` that this rank owns.

        Args:
            k, v: ``[c, Hkv, d]`` pre-RoPE keys and values of the chunk (all ranks hold the chunk).
            scale_rows: with FP8 keys, the sequence's first append (``pos`` 0) sets the layer's
                ``k_center`` and ``k_scale`` from the score keys of its first ``scale_rows`` tokens (None: all). Every
                rank holds them all, so every rank gets the same scale; the engine passes the chunk
                length, so the scale does not depend on the slab. Later keys quantize with it,
                saturating where they exceed it.
        """
        c = k.shape[0]
        if pos + c > self.capacity:
            raise RuntimeError(f"KV cache full: {pos + c} tokens > capacity {self.capacity}")
        if self.k8 is not None and pos == 0:
            k0, v0 = k[:scale_rows], v[:scale_rows]
            sk0 = score_keys(k0, v0, self.score_norm) if self.score_norm else k0
            self.k_center[layer] = key_center(sk0)
            self.k_scale[layer] = key_scale(sk0, center=self.k_center[layer])
        if self.world == 1:
            lo, hi = pos, pos + c
        else:
            # This rank's tokens of [pos, pos + c) are the contiguous local rows [lo, hi): their global
            # indices come from the layout, so nothing waits on the device for a mask's count.
            lo, hi = self.local_rows(pos, pos + c)
            rel = self.to_global(torch.arange(lo, hi, device=k.device)) - pos  # rows of the chunk
            k, v = k[rel], v[rel]
        self.k[layer, lo:hi] = k
        self.v[layer, lo:hi] = v
        if self.score_norm:
            self.score_k[layer, lo:hi] = score_keys(k, v, self.score_norm)
        if self.k8 is not None:
            quantize_keys(
                self.score_k[layer, lo:hi],
                self.k_scale[layer],
                out=self.k8[layer, lo:hi],
                center=self.k_center[layer],
            )


def score_keys(k: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
    """The score keys of ``k, v [..., Hkv, d]`` for ``qkv`` (p = 1) / ``qkv2`` (p = 2): ``k * ||v||_p``,
    the norm in fp32, k's dtype out."""
    norm = torch.linalg.vector_norm(v.float(), p, dim=-1, keepdim=True)
    return (k.float() * norm).to(k.dtype)


def owner_of(g: torch.Tensor, page: int, world: int) -> torch.Tensor:
    """The rank that stores global index ``g`` (pages of ``page`` tokens striped over ``world`` ranks)."""
    return (g // page) % world


def to_local(g: torch.Tensor, page: int, world: int) -> torch.Tensor:
    """The local row of global index ``g`` on its owner."""
    if world == 1:
        return g
    return (g // page // world) * page + g % page


def local_capacity(capacity: int, world: int, page: int, rank: int) -> int:
    """Rows rank ``rank`` preallocates for ``capacity`` global tokens (whole pages)."""
    pages = math.ceil(capacity / page)
    return max(1, (pages - rank + world - 1) // world) * page


class Window:
    """Every rank's copy of the first ``sink`` tokens and of the most recent tokens, all KV heads.

    The local window of a chunk (its last ``local`` tokens) and its sink are the same on every rank's
    request, so instead of fetching them from their owners each rank keeps them: the slab's K/V
    reaches every rank anyway (for the owners' appends), and writing it here too costs a copy. Only
    the selected middle tokens then cross the network. A ring of ``size`` rows holds token ``g`` at
    row ``g % size``; it must cover the local window of every chunk of a step (``sink + local +``
    the most tokens of a step, from the engine's :class:`~dist_reattn.config.ScopeLimits`). With one rank the cache itself holds every token and nothing is copied.

    Shapes: ``ring_k``, ``ring_v`` ``[layers, size, Hkv, d]``; ``sink_k``, ``sink_v`` ``[layers, sink, Hkv, d]``.
    """

    def __init__(self, cache: KVCache, sink: int, local: int, step: int):
        self.cache, self.sink, self.step = cache, sink, step
        self.size = window_size(sink, local, step)
        self.n = 0  # tokens written
        self.ring_k = self.ring_v = self.sink_k = self.sink_v = None
        if cache.world > 1:
            layers, _, hkv, d = cache.k.shape
            new = lambda rows: cache.k.new_empty((layers, rows, hkv, d))  # noqa: E731
            self.ring_k, self.ring_v, self.sink_k, self.sink_v = (
                new(self.size),
                new(self.size),
                new(sink),
                new(sink),
            )

    def nbytes(self) -> int:
        return 0 if self.ring_k is None else 2 * (self.ring_k.nbytes + self.sink_k.nbytes)

    @property
    def lo(self) -> int:
        """The earliest token the ring still holds (every token from it to ``n`` is there)."""
        return max(0, self.n - self.size)

    def append(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keeps tokens ``[pos, pos + c)`` of one layer (``k, v [c, Hkv, d]``, every rank the same)."""
        c = k.shape[0]
        self.n = max(self.n, pos + c)
        if self.ring_k is None:
            return
        assert c <= self.step, f"a step of {c} tokens > {self.step}: it would overrun the window"
        rows = torch.arange(pos, pos + c, device=k.device) % self.size
        self.ring_k[layer, rows], self.ring_v[layer, rows] = k, v
        if pos < self.sink:
            m = min(self.sink, pos + c) - pos
            self.sink_k[layer, pos : pos + m], self.sink_v[layer, pos : pos + m] = k[:m], v[:m]

    def append_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keeps token ``pos`` (``[1]``, a device index past the sink) of one layer (``k, v [1, Hkv, d]``);
        the caller advances ``n``."""
        if self.ring_k is not None:
            row = pos % self.size
            self.ring_k[layer].index_copy_(0, row, k)
            self.ring_v[layer].index_copy_(0, row, v)

    def read(self, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[..., Hkv, d]`` of global ``tokens [...]``, each in ``[lo, n)``."""
        if self.ring_k is None:
            return self.cache.k[layer, tokens], self.cache.v[layer, tokens]
        rows = tokens % self.size
        return self.ring_k[layer, rows], self.ring_v[layer, rows]

    def read_sink(self, layer: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[sink, Hkv, d]`` of tokens ``[0, sink)``, ``sink`` at most the window's."""
        if self.sink_k is None:
            return self.cache.k[layer, :sink], self.cache.v[layer, :sink]
        return self.sink_k[layer, :sink], self.sink_v[layer, :sink]


def window_size(sink: int, local: int, step: int) -> int:
    """Rows of the ring: a chunk's local window starts at most ``local + step`` tokens before the end
    of its step, and a chunk short of ``sink + local`` (plain attention over everything) needs
    every token from 0."""
    return sink + local + step
