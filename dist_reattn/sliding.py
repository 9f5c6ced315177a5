"""Sliding-window layers (Gemma3's local layers): each keeps only its own window, on every rank.

A sliding layer's query at token ``i`` sees the keys of tokens ``(i - W, i]``: the ``W`` most recent
tokens, itself included (Hugging Face's ``sliding_window_overlay``: ``kv_idx > q_idx - W``). Such a
layer never looks further back, so it needs no KV cache and no retrieval: every rank keeps the pre-RoPE
K/V of the last ``W - 1`` tokens per sliding layer (:class:`SlidingLayers`), and a step attends over
those plus its own tokens. The buffer is replicated: with sequence groups a step's K/V reaches every
rank (:func:`dist_reattn.exchange.slab_qkv`, K/V only), so every rank's chunks find their ``W - 1``
previous tokens whichever rank ran them; steps that every rank runs (decode, tensor parallelism,
steps of fewer chunks than ranks) move nothing.

Positions: RoPE makes ``q . k`` depend only on the distance between the two tokens, so queries and
keys are renumbered inside each block (keys ``0..W-2+b``, the block's ``b`` queries the last ``b``
of those) and rotated with the layer's own rotary (Gemma3: theta 1e4). That is exact, and keeps
positions small at any context length.

Layout in this file: tokens first for stored K/V ``[t, Hkv, d]``, heads first for attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import exchange
from .attention import apply_rope
from .distributed import Comm
from .exchange import Part
from .profile import Profile


class SlidingLayers:
    """The last ``window - 1`` tokens' pre-RoPE K/V of every sliding layer, and their attention.

    Args:
        layers: the model's sliding layers (indices into its decoder layers).
        window: ``W``, the tokens a query sees, itself included.
        kv_heads: KV heads this rank attends with (all of them, or its tensor-parallel share).
        block: queries attended per block (``scope.chunk``): a block of ``b`` queries reads
            ``W - 1 + b`` keys, so the band mask wastes at most half of the work at ``b = W``.
        rope: ``positions [m] -> (cos, sin) [m, d]`` of the sliding layers' rotary.

    Shapes: ``k``, ``v`` ``[len(layers), W - 1, kv_heads, d]``; row ``t`` holds token ``n0 - (W - 1) + t``
    before a step starting at ``n0`` (rows of tokens < 0 are masked out).
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        window: int,
        kv_heads: int,
        head_dim: int,
        block: int,
        dtype: torch.dtype,
        device: torch.device,
        rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ):
        assert window >= 1 and block >= 1
        self.layers = frozenset(layers)
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.window, self.block = window, block
        shape = (len(layers), window - 1, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cos, self.sin = rope(torch.arange(window - 1 + block))  # [W - 1 + block, d]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of every sliding layer's buffer (``scope.select=mass_shared`` runs a token twice)."""
        return self.k.clone(), self.v.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Puts back the buffers :meth:`state` copied."""
        self.k.copy_(state[0])
        self.v.copy_(state[1])

    def attend_step(
        self,
        comm: Comm,
        part: Part,
        n0: int | torch.Tensor,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """One sliding layer's attention for one engine step, and the update of its buffer.

        Args:
            part: the step's chunks and which rank runs them; the step covers tokens ``[n0, n0 + c)``.
            n0: an int, or a ``[1]`` device tensor (the static decode step: nothing read on the host).
            q: ``[h, c_r, d]``; k, v: ``[h_kv, c_r, d]``; un-rotated, this rank's heads and tokens.

        Returns:
            ``[c_r, h, d]``.
        """
        if part.split:  # every rank needs the whole step's K/V (no queries: 0 heads of q travel)
            _, k, v = exchange.slab_qkv(comm, part.counts(), q[:0], k, v)
        s, keep = self.slot[layer], self.window - 1
        keys = torch.cat([self.k[s], k.transpose(0, 1)])  # [W - 1 + c, Hkv, d]: tokens n0 - W + 1 ..
        values = torch.cat([self.v[s], v.transpose(0, 1)])
        first = keep + part.span()[0]  # row of this rank's first query
        out = window_attention(
            q, keys, values, first, keep - n0, self.window, self.block, self.cos, self.sin, scaling
        )
        self.k[s] = keys[keys.shape[0] - keep :]
        self.v[s] = values[values.shape[0] - keep :]
        return out


class LayerStep:
    """The step object a forward hands every attention layer (``reattn_step``): a sliding layer
    attends over its own window whatever the mode; any other layer goes to :meth:`attend_cached`
    with its index in the KV cache. Subclasses (:class:`~dist_reattn.engine.Step`,
    :class:`~dist_reattn.decode.StaticStep`) implement :meth:`attend_cached`.

    Args:
        sliding: the sliding layers' windows, or None; cache_slot: model layer -> cache layer.
        comm, profile, part: the step's ranks, the engine's profile, the step's chunks.
        n0: the step's first token: an int, or a ``[1]`` device tensor.
    """

    def __init__(
        self,
        sliding: SlidingLayers | None,
        cache_slot: dict[int, int],
        comm: Comm,
        profile: Profile,
        part: Part,
        n0: int | torch.Tensor,
    ):
        self.sliding, self.cache_slot, self.comm = sliding, cache_slot, comm
        self.profile, self.part, self.n0 = profile, part, n0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """The model's attention hook. Args: q ``[h, c_r, d]``; k, v ``[h_kv, c_r, d]``, un-rotated.
        Returns ``[c_r, h, d]``."""
        scaling = scaling or q.shape[-1] ** -0.5
        if self.sliding is not None and layer in self.sliding.layers:
            with self.profile.phase("attention"):
                return self.sliding.attend_step(self.comm, self.part, self.n0, layer, q, k, v, scaling)
        return self.attend_cached(self.cache_slot[layer], q, k, v, scaling)

    def attend_cached(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        """A layer of the KV cache (``layer``: its index there); the arguments as :meth:`attend`'s."""
        raise NotImplementedError


def window_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    first: int,
    valid_from: int | torch.Tensor,
    window: int,
    block: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Causal sliding-window attention of consecutive queries, in blocks of ``block`` queries.

    Args:
        q: ``[H, c, d]`` un-rotated queries of the tokens at rows ``first .. first + c - 1`` of ``keys``.
        keys, values: ``[m, Hkv, d]`` un-rotated, consecutive tokens; ``first >= window - 1``.
        valid_from: rows before it are not tokens (the sequence starts there); an int or a ``[1]``
            device tensor, at most 0 once the sequence fills the window.
        window: query row ``r`` sees rows ``(r - window, r]``.
        cos, sin: ``[>= window - 1 + block, d]`` rotary tables at positions ``0, 1, ...``.

    Returns:
        ``[c, H, d]``.
    """
    H, c, d = q.shape
    keep = window - 1
    assert first >= keep and first + c <= keys.shape[0] and H % keys.shape[1] == 0
    b = min(block, c)
    nb = math.ceil(c / b)
    span = keep + b  # keys of one block
    lo = first - keep  # row of the first block's first key
    pad = lo + (nb - 1) * b + span - keys.shape[0]
    if pad > 0:  # the last block's slice runs past the keys: pad (masked below)
        keys = torch.cat([keys, keys.new_zeros((pad, *keys.shape[1:]))])
        values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    kb = keys[lo:].unfold(0, span, b)[:nb].permute(0, 1, 3, 2)  # [nb, Hkv, span, d]
    vb = values[lo:].unfold(0, span, b)[:nb].permute(0, 1, 3, 2)
    if nb * b > c:
        q = torch.cat([q, q.new_zeros((H, nb * b - c, d))], dim=1)
    qb = q.unflatten(1, (nb, b)).transpose(0, 1)  # [nb, H, b, d]
    # key t of a block sits at position t, query i at keep + i: distances are the true ones
    qb = apply_rope(qb, cos[keep:span], sin[keep:span])
    kb = apply_rope(kb, cos[:span], sin[:span])
    t = torch.arange(span, device=q.device)
    i = torch.arange(b, device=q.device)
    band = (t[None, :] >= i[:, None]) & (t[None, :] <= i[:, None] + keep)  # [b, span]
    row = lo + torch.arange(nb, device=q.device)[:, None] * b + t[None, :]  # [nb, span] key rows
    mask = band[None] & (row >= valid_from)[:, None, :]  # [nb, b, span]
    gqa = kb.shape[1] != H
    if gqa and q.is_cuda:  # fused kernels take a mask only without enable_gqa: expand K/V heads
        kb, vb = kb.repeat_interleave(H // kb.shape[1], 1), vb.repeat_interleave(H // kb.shape[1], 1)
        gqa = False
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).flatten(0, 1)[:c]  # [c, H, d]


def sliding_bytes(layers: int, window: int, kv_heads: int, head_dim: int, dtype_bytes: int, step: int) -> int:
    """Memory of the sliding layers on one rank: every layer's ``W - 1`` kept tokens, plus one layer's
    transient keys and values of a step (the kept tokens and the step's ``step`` tokens)."""
    if not layers:
        return 0
    row = kv_heads * head_dim * 2 * dtype_bytes
    return layers * (window - 1) * row + (window - 1 + step) * row
