"""The memory plan: what one rank needs, made before anything is allocated or any weight loads.

KV per rank is ``ceil(N / P)`` (whole pages) x cached layers x Hkv x d x 2 x dtype bytes (the cached
layers: all but the sliding-window ones); with several ranks each also keeps the replicated window
(:class:`dist_reattn.cache.Window`); every rank keeps the sliding layers' own windows
(:class:`dist_reattn.sliding.SlidingLayers`); the rest bounds the transient tensors of one forward.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .cache import local_capacity, window_size
from .config import SCORE_NORMS, ConfigError, ScopeConfig, ScopeLimits
from .models.spec import ModelSpec
from .sliding import sliding_bytes

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class MemoryPlan:
    """Bytes one rank needs, against what its device has free."""

    device: str
    kv_bytes: int
    weight_bytes: int
    activation_bytes: int
    available_bytes: int
    window_bytes: int = 0
    """The replicated sink and recent-token window (several ranks only)."""
    sliding_bytes: int = 0
    """The sliding-window layers' own windows (Gemma3), on every rank."""

    @property
    def total(self) -> int:
        return (
            self.kv_bytes + self.window_bytes + self.sliding_bytes + self.weight_bytes + self.activation_bytes
        )

    def fits(self) -> bool:
        return self.total <= self.available_bytes

    def describe(self) -> str:
        window = f" + window {gib(self.window_bytes)}" if self.window_bytes else ""
        window += f" + sliding windows {gib(self.sliding_bytes)}" if self.sliding_bytes else ""
        return (
            f"per rank on {self.device}: KV {gib(self.kv_bytes)}{window} + weights {gib(self.weight_bytes)} + "
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
    page: int = 1,
    slab: int = 1,
    sink: int = 0,
    local: int = 0,
    score_keys: bool = False,
    fp8_keys: bool = False,
) -> MemoryPlan:
    """Plans one rank's memory for a cache of ``tokens`` tokens, before any weight is loaded.

    The activation term bounds the transient tensors of one forward of ``slab`` chunks: the blocked
    score tiles, the scope K/V of every chunk with their rotated copies (and, with several ranks,
    the send and receive buffers of the compacted scope K/V exchange, each at most the scope's
    size), the masks, the attention scores of the math SDPA path (CPU; the GPU's fused kernels keep
    them on chip), and the MLP intermediates. Weights count whole: with sequence groups every rank
    holds the whole model, and under tensor parallelism every rank loads it whole before AutoTP
    shards it. ``score_keys``: the cache also keeps weighted score keys (``scope.select`` qkv,
    qkv2), half as many bytes again as K and V. ``fp8_keys``: the cache also keeps the score keys in
    FP8 (``scope.scoring=fp8``), one byte per key element, and their fp32 centre and scale per layer.
    """
    b = DTYPE_BYTES[dtype]
    rows = local_capacity(tokens, world, page, 0)
    kv = rows * spec.kv_bytes_per_token(b) * (3 if score_keys else 2) // 2
    if fp8_keys:  # k8 [layers, rows, Hkv, d] of 1 byte, k_center and k_scale [layers, Hkv, d] fp32
        kv += rows * spec.kv_bytes_per_token(1) // 2 + spec.kv_bytes_per_token(4)
    window = 0
    if world > 1:
        window = (window_size(sink, local, slab * chunk) + sink) * spec.kv_bytes_per_token(b)
    weights = spec.n_params() * b
    step = slab * chunk
    sliding = sliding_bytes(
        len(spec.sliding_layers), spec.sliding_window, spec.kv_heads, spec.head_dim, b, step
    )
    scope = tokens if full_mode else min(tokens, max_scope)
    batch = 1 if full_mode else slab  # chunks attending at once (full mode attends chunk by chunk)
    # Per chunk: the bool mask, and either the additive bias SDPA's fused kernel builds from it (GPU,
    # bounded at one per head in the model dtype) or the math path's fp32 scores (CPU).
    scores = chunk * scope * (1 + spec.heads * (b if device.type == "cuda" else 4))
    exchange = 2 * 2 * scope * spec.kv_heads * spec.head_dim * b if world > 1 else 0
    act = (
        spec.heads * chunk * 4096 * 4 * 2  # score block + its top-k working set, fp32
        + batch * 4 * scope * spec.heads * spec.head_dim * b  # scope K, V and their rotated copies
        + batch * (scores + exchange)
        + 4 * slab * chunk * spec.intermediate * 4  # MLP intermediates of the slab's tokens (fp32 bound)
        + spec.vocab * 4 * 4  # the last token's logits
    )
    if fp8_keys and device.type != "cuda":  # the FP8 reference's tile mask, bool [H, c, 4096, keep <= 16]
        act += spec.heads * chunk * 4096 * 16
    return MemoryPlan(str(device), kv, weights, act, available_bytes(device), window, sliding)


def plan_for_scope(
    spec: ModelSpec,
    scope: ScopeConfig,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    world: int = 1,
    page: int = 1,
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
        sink=scope.sink,
        local=scope.local,
        score_keys=scope.select in SCORE_NORMS,
        fp8_keys=scope.scoring == "fp8",
    )


def widest(scopes, device_type: str) -> ScopeConfig:
    """One scope at least as demanding as each of ``scopes`` in every planned field (sink, local,
    chunk, slab, spans; ``full`` if any is; ``scoring=fp8`` if any is, so that its cache keeps the FP8
    keys): an engine built for it serves each of them, and its memory plan bounds each one's."""
    scopes = list(scopes)
    ScopeLimits.of(scopes, device_type)  # one kind of score keys for all, or a ConfigError
    fields = ("sink", "local", "chunk", "topk", "span", "recall_clip")
    return dataclasses.replace(
        scopes[0],
        **{f: max(getattr(s, f) for s in scopes) for f in fields},
        slab=max(s.slab_on(device_type) for s in scopes),
        mode="full" if any(s.mode == "full" for s in scopes) else scopes[0].mode,
        # the margin sizes nothing: 0 keeps the widest topk valid (topk + fp8_margin <= MAX_KEEP)
        **({"scoring": "fp8", "fp8_margin": 0} if any(s.scoring == "fp8" for s in scopes) else {}),
    )


def check_memory(plan: MemoryPlan, tokens: int, world: int) -> None:
    """Refuses a run that cannot fit, with the numbers and what to change."""
    if plan.fits():
        return
    raise ConfigError(
        f"does not fit: {tokens} tokens need {plan.describe()}; "
        f"use more ranks (now {world}), a shorter --len, or a smaller dtype (--model.dtype=bf16)"
    )
