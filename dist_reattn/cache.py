"""The sequence-sharded pre-RoPE KV cache and the memory plan made before anything is allocated.

Tokens are grouped in pages of ``page`` tokens; page ``p`` lives on rank ``p mod P`` (striped), so
every shard grows at the same rate during prefill. A rank stores its tokens in global order, so
any global range ``[lo, hi)`` is one contiguous range of its local rows. With P = 1 local row and
global index coincide.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .config import ConfigError, ScopeConfig
from .models.spec import ModelSpec

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class KVCache:
    """This rank's share of every layer's pre-RoPE keys and values, preallocated once.

    Shapes: ``k``, ``v`` are ``[layers, local_capacity, Hkv, d]``.
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
        page: int = 256,
    ):
        assert 0 <= rank < world and page > 0 and capacity > 0
        self.rank, self.world, self.page, self.capacity = rank, world, page, capacity
        self.local_capacity = local_capacity(capacity, world, page, rank)
        shape = (layers, self.local_capacity, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

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

    def owned_mask(self, g: torch.Tensor) -> torch.Tensor:
        """True where global index ``g`` lives on this rank."""
        return (g // self.page) % self.world == self.rank

    def to_local(self, g: torch.Tensor) -> torch.Tensor:
        """Local rows of global indices owned by this rank."""
        if self.world == 1:
            return g
        return (g // self.page // self.world) * self.page + g % self.page

    def append(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the tokens ``[pos, pos + c)`` that this rank owns.

        Args:
            k, v: ``[c, Hkv, d]`` pre-RoPE keys and values of the chunk (all ranks hold the chunk).
        """
        c = k.shape[0]
        if pos + c > self.capacity:
            raise RuntimeError(f"KV cache full: {pos + c} tokens > capacity {self.capacity}")
        if self.world == 1:
            self.k[layer, pos : pos + c] = k
            self.v[layer, pos : pos + c] = v
            return
        g = torch.arange(pos, pos + c, device=k.device)
        mine = self.owned_mask(g)
        rows = self.to_local(g[mine])
        self.k[layer, rows] = k[mine]
        self.v[layer, rows] = v[mine]


def local_capacity(capacity: int, world: int, page: int, rank: int) -> int:
    """Rows rank ``rank`` preallocates for ``capacity`` global tokens (whole pages)."""
    pages = math.ceil(capacity / page)
    return max(1, (pages - rank + world - 1) // world) * page


@dataclass
class MemoryPlan:
    """Bytes one rank needs, against what its device has free."""

    device: str
    kv_bytes: int
    weight_bytes: int
    activation_bytes: int
    available_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.weight_bytes + self.activation_bytes

    def fits(self) -> bool:
        return self.total <= self.available_bytes

    def describe(self) -> str:
        return (
            f"per rank on {self.device}: KV {gib(self.kv_bytes)} + weights {gib(self.weight_bytes)} + "
            f"activations {gib(self.activation_bytes)} = {gib(self.total)}; available {gib(self.available_bytes)}"
        )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: GPU free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_memory(
    spec: ModelSpec,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    chunk: int,
    max_scope: int,
    full_mode: bool,
    world: int = 1,
    page: int = 256,
    slab: int = 1,
) -> MemoryPlan:
    """Plans one rank's memory for a cache of ``tokens`` tokens, before any weight is loaded.

    KV per rank is ``ceil(tokens / P)`` (whole pages) x layers x Hkv x d x 2 x dtype bytes. The
    activation term bounds the transient tensors of one forward of ``slab`` chunks: the blocked
    score tiles, the gathered scope K/V of every chunk with their rotated copies, the masks, the
    attention scores of the math SDPA path (CPU; the GPU's fused kernels keep them on chip), and
    the MLP intermediates. Weights count whole even under tensor parallelism: every rank loads the
    whole model before AutoTP shards it, so that is the rank's peak.
    """
    b = DTYPE_BYTES[dtype]
    rows = local_capacity(tokens, world, page, 0)
    kv = rows * spec.kv_bytes_per_token(b)
    weights = spec.n_params() * b
    scope = tokens if full_mode else min(tokens, max_scope)
    batch = 1 if full_mode else slab  # chunks attending at once (full mode attends chunk by chunk)
    # Per chunk: the bool mask, and either the additive bias SDPA's fused kernel builds from it (GPU,
    # bounded at one per head in the model dtype) or the math path's fp32 scores (CPU).
    scores = chunk * scope * (1 + spec.heads * (b if device.type == "cuda" else 4))
    act = (
        spec.heads * chunk * 4096 * 4 * 2  # score block + its top-k working set, fp32
        + batch * 4 * scope * spec.heads * spec.head_dim * b  # scope K, V and their rotated copies
        + batch * scores
        + 4 * slab * chunk * spec.intermediate * 4  # MLP intermediates of the slab's tokens (fp32 bound)
        + spec.vocab * 4 * 4  # the last token's logits
    )
    return MemoryPlan(str(device), kv, weights, act, available_bytes(device))


def plan_for_scope(
    spec: ModelSpec,
    scope: ScopeConfig,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    world: int = 1,
    page: int = 256,
) -> MemoryPlan:
    """:func:`plan_memory` for a run with these scope settings (chunk, slab, scope size, mode)."""
    return plan_memory(
        spec,
        tokens,
        dtype,
        device,
        chunk=scope.chunk,
        max_scope=scope.max_scope(),
        full_mode=scope.mode == "full",
        world=world,
        page=page,
        slab=scope.slab_on(device.type),
    )


def check_memory(plan: MemoryPlan, tokens: int, world: int) -> None:
    """Refuses a run that cannot fit, with the numbers and what to change."""
    if plan.fits():
        return
    raise ConfigError(
        f"does not fit: {tokens} tokens need {plan.describe()}; "
        f"use more ranks (now {world}), a shorter --len, or a smaller dtype (--model.dtype=bf16)"
    )
