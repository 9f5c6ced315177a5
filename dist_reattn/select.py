"""The retrieval step of ReAttention (DESIGN section 2, steps 3-6).

Every rank scores its own middle tokens (local top-k), the candidates of all ranks are merged into
the exact global top-k per (query token, query head), and every rank then derives the same scope
from them: votes, recall clip, spans, and the sink and local windows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import apply_rope
from .cache import KVCache
from .config import MASS_SELECTIONS, ConfigError, ScopeConfig
from .kernels import (
    check_fp8,
    score_topk,
    score_topk_fp8,
    score_topk_fp8_ref,
    score_topk_ref,
    sort_topk,
    supports,
)

# The agreement sample of scope.scoring=fp8: the first FP8_SAMPLE_TOKENS query tokens of every
# FP8_SAMPLE_EVERY-th chunk (counted from the first chunk that retrieves), also scored exactly.
FP8_SAMPLE_TOKENS = 8
FP8_SAMPLE_EVERY = 16

# Mantissa bits the fused mass keeps when ranked (mass_candidates): masses that agree to 2^-MASS_BITS
# relative rank as equal (then the lower token first), so that the rounding of the softmax's
# normalisation, which differs with the number of ranks it is reduced over, reorders no near-tie.
MASS_BITS = 12


@dataclass(frozen=True)
class Scoring:
    """What the retrieval's top-k ranks middle keys by (``scope.select``) and how it is computed
    (``scope.scoring``), for prefill and decode alike: the one place the choice lives.

    ``paper``, ``qkv`` and ``qkv2`` score the query against the cache's score keys (``KVCache.score_k``:
    the keys, or the keys weighted by their value's norm); ``qk_pe`` rotates the query by RoPE at
    the fixed distance ``local`` first, which equals scoring both after RoPE at positions that
    distance apart (``R(p)q . R(p - r)k = R(r)q . k``).

    ``scoring=fp8`` (``fp8_margin`` set) picks each row's best ``topk + fp8_margin`` tiles on the
    cache's FP8 score keys and scores their keys exactly (:func:`local_topk`), where the end row is
    a host int: prefill chunks and one-token steps through the prefill's step. A device end (the
    static decode step, eager or a CUDA graph) keeps the exact kernel: the FP8 launcher sizes its
    grid and plan from a host end row. On a sample of rows (:data:`FP8_SAMPLE_TOKENS` tokens of
    every :data:`FP8_SAMPLE_EVERY`-th chunk and of decode tokens at the same period, every layer,
    every head) the exact top-k is computed too, over the same keys, and ``count`` gets
    ``fp8_rows_sampled`` and ``fp8_rows_equal`` (rows whose index set is the exact one). That is
    ``8 / (16 * chunk)`` of the query rows scored a second time, exactly (0.1% at chunk 512), with
    no host sync (the counts stay on the device until the profile is read). With several ranks each
    rank counts its own shard's lists.

    Attributes:
        cos, sin: ``[d]`` the rotation of the query (``qk_pe``), or None.
        fp8_margin: ``scope.fp8_margin`` under ``scoring=fp8``; None: exact.
        count: where the agreement counters go (``Profile.count``), or None.
    """

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    fp8_margin: int | None = None
    count: Callable | None = None

    @staticmethod
    def of(cfg: ScopeConfig, rope, count: Callable | None = None) -> Scoring:
        """The scoring of ``cfg.select`` and ``cfg.scoring``; ``rope(m)`` gives the model's cos, sin
        ``[m, d]`` for positions ``0..m-1``; ``count(name, n)`` takes the FP8 agreement counters."""
        cos = sin = None
        if cfg.select == "qk_pe":
            cos, sin = rope(cfg.local + 1)
            cos, sin = cos[cfg.local], sin[cfg.local]
        margin = cfg.fp8_margin if cfg.scoring == "fp8" else None
        return Scoring(cos, sin, margin, count)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """The queries ``[..., d]`` as scored."""
        return q if self.cos is None else apply_rope(q, self.cos.to(q.dtype), self.sin.to(q.dtype))


def check_fp8_scoring(device: torch.device) -> None:
    """Refuses ``scope.scoring=fp8`` on a GPU without FP8 tensor cores: a ConfigError, one line naming it."""
    try:
        check_fp8(device)
    except RuntimeError as e:
        raise ConfigError(f"scope.scoring=fp8: {e}: use --scope.scoring=exact on this GPU") from None


def retrieval_heads(path: str, layers: int, heads: int, device: torch.device) -> list[torch.Tensor | None]:
    """The ``scope.heads`` file as one ``[heads]`` bool mask per retrieving layer (None: no head listed).

    The file is ``{"heads": {"<retrieving layer>": [query heads...]}, ...}``, layers counted in the
    order they retrieve (the cache's layers), as the selection probe reports them.

    Raises:
        ConfigError: the file does not parse, or names a layer or head this model does not have.
    """
    if not path:
        return [None] * layers
    try:
        with open(path) as f:
            listed = {int(k): [int(h) for h in v] for k, v in json.load(f)["heads"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"scope.heads={path!r} is not a retrieval-heads file ({e})") from None
    bad = [(k, h) for k, hs in listed.items() for h in hs if not (0 <= k < layers and 0 <= h < heads)]
    if bad:
        raise ConfigError(
            f"scope.heads={path!r} names layer/head {bad[0]}, outside this model's {layers} retrieving "
            f"layers x {heads} heads: make the file with this model"
        )
    masks: list[torch.Tensor | None] = [None] * layers
    for k, hs in listed.items():
        if hs:
            masks[k] = torch.zeros(heads, dtype=torch.bool, device=device)
            masks[k][hs] = True
    return masks


def local_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    lo: int,
    hi: int | torch.Tensor,
    topk: int,
    fp8: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``q . k`` over local key rows ``[lo, hi)``: exact, or chosen on FP8 keys (``fp8``).

    Uses the Triton kernels where they run (CUDA tensors) and the pure-torch references elsewhere.

    Args:
        q: ``[c, H, d]`` un-rotated queries of all heads.
        keys: ``[N_local, Hkv, d]`` this rank's un-rotated keys of one layer.
        hi: an int, or a one-element tensor on q's device (read there by the kernel: graph decode).
        fp8: ``(k8 [N_local, Hkv, d], scale [Hkv, d], margin)``: the best ``topk + margin`` tiles of
            each row by FP8 score, their keys scored exactly (``score_topk_fp8``; an int ``hi`` only).

    Returns:
        ``(scores, rows)``: ``[c, H, topk]`` fp32 scores and int64 local rows (-1 for padding).
    """
    if fp8 is None:
        fn = score_topk if q.is_cuda and supports(q.device) else score_topk_ref
        return fn(q, keys, lo, hi, topk)
    assert not isinstance(hi, torch.Tensor), "the FP8 path takes a host end row"
    k8, scale, margin = fp8
    fn = score_topk_fp8 if q.is_cuda else score_topk_fp8_ref  # (an old GPU: score_topk_fp8 says so)
    return fn(q, keys, k8, scale, lo, hi, topk, margin)


def sampled_rows(first: int, c: int, cfg: ScopeConfig) -> tuple[int, int]:
    """The rows ``[i0, i1)`` of a step's ``c`` query tokens from token ``first`` that the FP8
    agreement samples: tokens ``t`` with ``(t - t0) % (FP8_SAMPLE_EVERY * chunk) < FP8_SAMPLE_TOKENS``,
    ``t0`` the first token of the first chunk that retrieves (so short prompts are sampled too)."""
    period = FP8_SAMPLE_EVERY * cfg.chunk
    r = (first - (cfg.sink + cfg.local) // cfg.chunk * cfg.chunk) % period
    i0 = 0 if r < FP8_SAMPLE_TOKENS else period - r  # where the next window starts
    i1 = min(c, i0 + FP8_SAMPLE_TOKENS - (r if r < FP8_SAMPLE_TOKENS else 0))
    return i0, max(i0, i1)


def score_chunks(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    ends: list[int] | torch.Tensor,
    cfg: ScopeConfig,
    scoring: Scoring = Scoring(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's top-k of each chunk's queries over its own middle tokens, under ``scoring``: exact,
    or chosen on FP8 keys (``scope.scoring=fp8`` and int ends; the agreement sampled, :class:`Scoring`).

    Args:
        q: ``[B, c, H, d]`` un-rotated queries of every head, chunk b ending at ``ends[b]``.
        ends: ints, or a ``[1]`` device tensor for one chunk (graph decode: nothing read on the host).

    Returns:
        ``(scores, index)``, ``[B, c, H, topk]``: fp32 scores and global token indices (-1 padding).
    """
    q = scoring.query(q)
    keys, c = cache.score_k[layer], q.shape[1]
    fp8 = None
    if scoring.fp8_margin is not None and not isinstance(ends, torch.Tensor):
        fp8 = (cache.k8[layer], cache.k_scale[layer], scoring.fp8_margin)
    found = []
    for b in range(q.shape[0]):
        if isinstance(ends, torch.Tensor):  # the kernel reads its end row on the device
            lo, hi = cache.local_count(cfg.sink), cache.local_count_at(ends - cfg.local)
        else:
            lo, hi = cache.local_rows(cfg.sink, ends[b] - cfg.local)
        found.append(local_topk(q[b], keys, lo, hi, cfg.topk, fp8))
        i0, i1 = sampled_rows(ends[b] - c, c, cfg) if fp8 is not None else (0, 0)
        if i1 > i0 and scoring.count is not None:  # the agreement: the same rows scored exactly
            exact = local_topk(q[b, i0:i1], keys, lo, hi, cfg.topk)[1].sort(-1).values
            same = (found[-1][1][i0:i1].sort(-1).values == exact).all(-1)  # [i1 - i0, H]
            scoring.count("fp8_rows_sampled", same.numel())
            scoring.count("fp8_rows_equal", same.sum())
    scores = torch.stack([f[0] for f in found])
    return scores, cache.to_global(torch.stack([f[1] for f in found]))


def fuses_mass(cfg: ScopeConfig, c: int) -> bool:
    """Whether a step of ``c`` query tokens selects by fused attention mass (``scope.select=mass`` or
    ``mass_shared``: steps of one token, the prompt's last and decode; longer steps select as the
    paper does)."""
    return cfg.select in MASS_SELECTIONS and c == 1 and retrieves(cfg)


def mass_candidates(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    end: int | torch.Tensor,
    cfg: ScopeConfig,
    comm,
    acc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's best ``recall_clip`` middle keys by attention mass fused over heads and layers.

    The mass of key ``j`` at one layer is ``sum_h softmax_j(q_h . k_j / sqrt(d))``, the softmax over
    the middle keys of every rank (the log-sum-exp is all-gathered: ``[P, H]`` floats). It is added
    to the mass of the step's earlier retrieving layers (``acc``), so layer ``l`` selects by the mass
    of layers ``0..l``: the selection probe (``probe_fused``, ``psum_upto``) ranks the answer there
    within the top ~20 keys on prose where every single head ranks it in the hundreds.

    Every shape is fixed: the mass runs over all ``local_capacity`` rows of this rank's cache, the
    rows outside the middle ``[sink, end - local)`` masked, so the static decode step (a device
    ``end``, a CUDA graph) and the prefill's one-token step (a host ``end``) compute the same values
    the same way. A step of one token reads ``local_capacity`` keys per layer where the paper's kernel
    reads the ``end`` it holds: the same at a full cache.

    Args:
        q: ``[H, d]`` the one query token's un-rotated queries, every head.
        end: tokens in the cache including the token: an int, or ``[1]`` on the cache's device.
        acc: this rank's mass of the step's earlier layers ``[local_capacity]`` (None at the first layer).

    Returns:
        ``(scores, index, acc)``: ``[1, 1, 1, recall_clip]`` fused masses rounded to
        :data:`MASS_BITS` mantissa bits (fp32, ``-inf`` padding) and global token indices (``-1``
        padding), best first, ties to the lower index; and the new ``acc``.
    """
    keys = cache.score_k[layer]  # [rows, Hkv, d]
    rows = keys.shape[0]
    token = cache.to_global(torch.arange(rows, device=keys.device))
    middle = (token >= cfg.sink) & (token < end - cfg.local)  # [rows]
    H, d = q.shape
    s = _scores_fp32(q.unflatten(0, (keys.shape[1], -1)), keys).flatten(0, 1)  # [H, rows]
    s = torch.where(middle, s * d**-0.5, float("-inf"))  # (rows past the end hold anything, NaN too)
    lse = torch.logsumexp(s, dim=1)  # [H]; -inf for an empty middle
    if comm.world > 1:
        lse = torch.logsumexp(comm.all_gather(lse, "mass_lse"), dim=0)
    mass = torch.exp(s - lse[:, None]).nan_to_num_(0.0).sum(0)  # [rows]
    acc = mass if acc is None else acc + mass
    m, e = torch.frexp(acc)  # acc = m * 2^e, m in [0.5, 1): keep MASS_BITS bits of m
    ranked = torch.ldexp(torch.round(m * 2.0**MASS_BITS) / 2.0**MASS_BITS, e)
    # One fp64 key per row that orders by the ranked mass, then the lower row (the lower token), so
    # a top-k (no sort of every row) is exact with ties: a positive mass of MASS_BITS bits times
    # (1 - row * 2^-40) is exact in fp64 and moves by less than half its gap to the next mass
    # (rows < 2^24); a mass of 0 ranks after every positive one, by row; outside the middle: -inf.
    assert rows < 2**24, f"{rows} rows of a rank's cache: the fused mass's ranking key holds < 2^24"
    r = torch.arange(rows, device=keys.device, dtype=torch.float64)
    key = torch.where(ranked > 0, ranked.double() * (1 - r * 2.0**-40), -(r + 1) * 2.0**-200)
    key = torch.where(middle, key, float("-inf"))
    if cfg.distinct:  # only each block's best row of this rank competes (keys are distinct per row)
        block = torch.where(middle, (token - cfg.sink) // cfg.span, 0)
        blocks = (rows // cache.page + 1) * cache.world * cache.page // cfg.span + 1  # > any block
        best = key.new_full((blocks,), float("-inf")).scatter_reduce_(0, block, key, "amax")
        key = torch.where(key == best[block], key, float("-inf"))
    k = min(cfg.recall_clip, rows)
    top, order = key.topk(k)
    scores = torch.where(top > float("-inf"), ranked[order], float("-inf"))
    index = torch.where(top > float("-inf"), token[order], -1)
    if k < cfg.recall_clip:
        scores = torch.cat([scores, scores.new_full((cfg.recall_clip - k,), float("-inf"))])
        index = torch.cat([index, index.new_full((cfg.recall_clip - k,), -1)])
    return scores[None, None, None], index[None, None, None], acc


def _scores_fp32(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q . k`` in fp32 of queries ``[Hkv, g, d]`` against keys ``[rows, Hkv, d]``: ``[Hkv, g, rows]``.

    On a GPU, half-precision keys go to cuBLAS as they are, with an fp32 result (products of two
    bf16 values are exact in fp32, the sum fp32): no fp32 copy of the cache is written and read.
    Elsewhere both sides are converted to fp32 first.
    """
    if keys.is_cuda and keys.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(q.to(keys.dtype), keys.permute(1, 2, 0), out_dtype=torch.float32)
    return torch.einsum("hgd,nhd->hgn", q.float(), keys.float())


def merge_candidates(
    scores: torch.Tensor, index: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from every rank's local top-k: exact, since each global winner is in its owner's list.

    Args:
        scores, index: ``[P, ..., c, H, k]`` candidates of all ranks, global indices (-1 for padding).

    Returns:
        ``[..., c, H, topk]`` scores and global indices, ordered by score then lower index.
    """
    s = scores.movedim(0, -2).flatten(-2)  # [..., c, H, P * k]
    i = index.movedim(0, -2).flatten(-2)
    return sort_topk(s, i, topk)


_PAD = torch.iinfo(torch.int64).max  # sorts after every real token index


@dataclass
class Scope:
    """The tokens one step attends to, in a fixed-size layout with padding.

    Every tensor may carry leading batch dimensions (one scope per chunk of a prefill slab).

    Attributes:
        tokens: ``[..., M]`` global token indices in scope order (padding entries hold 0).
        valid: ``[..., M]`` bool, False for padding; None when every entry is real.
        positions: ``[..., M]`` int64 position of each entry inside the scope (``0..|scope|-1`` over
            the real entries); None for ``0..M-1``.
    """

    tokens: torch.Tensor
    valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def row(self, b: int) -> Scope:
        """The scope of chunk ``b`` of a batch."""
        return Scope(
            self.tokens[b],
            None if self.valid is None else self.valid[b],
            None if self.positions is None else self.positions[b],
        )

    def selected(self) -> torch.Tensor:
        """The real tokens of one scope, ascending (waits for the device: for checks and records only)."""
        assert self.tokens.dim() == 1, "selected() of a batch: take .row(b) first"
        return self.tokens if self.valid is None else self.tokens[self.valid]


def vote(
    scores: torch.Tensor, index: torch.Tensor, recall_clip: int, heads: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools all (query, head) winners and keeps at most ``recall_clip`` tokens by vote count.

    Ties are broken by higher best score, then lower index, so every rank and every world size
    keeps the same set. Every shape is fixed by the inputs' (no ``unique``), so nothing here waits on
    the device.

    Args:
        scores, index: ``[..., c, H, k]`` global top-k per (query token, query head), index -1 for
            padding; leading dimensions are a batch of independent chunks.
        heads: ``[H]`` bool, the retrieval heads (``scope.heads``): a pick of one of them outvotes
            every pick of the other heads together (it counts ``c * H * k + 1``), so their picks
            fill the clip first, by their own votes; None: every pick counts one (the paper).

    Returns:
        ``(kept, valid)``, both ``[..., recall_clip]``: kept global indices in rank order, and which are real.
    """
    batch = index.shape[:-3]
    idx = index.reshape(-1, index.shape[-3:].numel())  # [B, T]
    sc = scores.reshape(idx.shape).float()
    B, T = idx.shape
    idx, order = torch.where(idx >= 0, idx, _PAD).sort(dim=1)
    sc = sc.gather(1, order)
    weight = torch.ones_like(idx)
    if heads is not None:  # [H] -> one weight per pick, in the sorted order
        per_head = torch.where(heads.to(idx.device), T + 1, 1)  # [H]
        weight = per_head[:, None].expand(index.shape[-3:]).reshape(1, T).expand(B, T).gather(1, order)
    first = torch.ones_like(idx, dtype=torch.bool)
    first[:, 1:] = idx[:, 1:] != idx[:, :-1]
    seg = first.cumsum(1) - 1  # [B, T] the distinct token each pick belongs to, ascending
    uniq = torch.full_like(idx, _PAD).scatter_(1, seg, idx)  # [B, T] distinct tokens, then _PAD
    votes = torch.zeros_like(idx).scatter_add_(1, seg, weight)
    votes = torch.where(uniq != _PAD, votes, -1)  # padding and unused slots rank last
    best = torch.full((B, T), float("-inf"), device=sc.device).scatter_reduce_(1, seg, sc, "amax")
    # Stable sorts, least significant key first: index asc (already), best desc, votes desc.
    rank = best.sort(dim=1, descending=True, stable=True).indices
    by_votes = votes.gather(1, rank).sort(dim=1, descending=True, stable=True).indices
    rank = rank.gather(1, by_votes)[:, :recall_clip]
    kept, valid = uniq.gather(1, rank), votes.gather(1, rank) > 0
    if kept.shape[1] < recall_clip:
        pad = recall_clip - kept.shape[1]
        kept = torch.cat([kept, kept.new_full((B, pad), _PAD)], dim=1)
        valid = torch.cat([valid, valid.new_zeros((B, pad))], dim=1)
    return kept.reshape(*batch, recall_clip), valid.reshape(*batch, recall_clip)


def widen(
    kept: torch.Tensor, valid: torch.Tensor, span: int, lo: int, hi: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widens each kept token j to ``[j - span//2, j - span//2 + span)``, clipped to ``[lo, hi)``.

    Args:
        kept, valid: ``[..., R]`` from :func:`vote`.
        hi: the end of the middle, an int or ``[...]`` (one per chunk of a batch).

    Returns:
        ``(tokens, valid)``, both ``[..., R * span]``: the distinct tokens ascending, then padding.
    """
    # Sort the R hits (not the R * span tokens: a sort of thousands of entries costs tens of us per
    # layer in decode). Equal-length intervals with ascending starts: interval i repeats only tokens
    # of interval i - 1, below that one's end, so dropping those leaves every token once, ascending.
    key = torch.where(valid, kept, _PAD).sort(dim=-1).values  # [..., R] ascending, padding last
    real = key != _PAD
    first = torch.where(real, key, 0) - span // 2  # [..., R] interval starts
    prev_end = torch.cat([torch.full_like(first[..., :1], lo), first[..., :-1] + span], dim=-1)
    tokens = first[..., None] + torch.arange(span, device=kept.device)  # [..., R, span]
    if isinstance(hi, torch.Tensor):
        hi = hi[..., None, None]
    ok = real[..., None] & (tokens >= lo) & (tokens < hi) & (tokens >= prev_end[..., None])
    tokens, ok = tokens.flatten(-2), ok.flatten(-2)  # [..., R * span]
    # Compaction by running count: entry i goes to slot (number of kept entries before it); the
    # dropped ones go to one extra slot, cut off below.
    m = tokens.shape[-1]
    slot = torch.where(ok, ok.cumsum(-1) - 1, m)
    out = torch.zeros((*tokens.shape[:-1], m + 1), dtype=tokens.dtype, device=tokens.device)
    out = out.scatter_(-1, slot, torch.where(ok, tokens, 0))[..., :m]
    valid = torch.arange(m, device=tokens.device) < ok.sum(-1, keepdim=True)
    return out, valid


def scope_of(n: int | torch.Tensor, cfg: ScopeConfig, selected: torch.Tensor, valid: torch.Tensor) -> Scope:
    """``[sink ; selected ; local]`` in original order, for a cache of ``n > sink + local`` tokens.

    Args:
        n: tokens in the cache including the chunk: an int, or ``[...]`` matching ``selected [..., m]``.
    """
    dev = selected.device
    batch = selected.shape[:-1]
    sink = torch.arange(cfg.sink, device=dev).expand(*batch, cfg.sink)
    if isinstance(n, int):  # (an int is never copied to the device: that copy would wait for it)
        local = torch.arange(n - cfg.local, n, device=dev).expand(*batch, cfg.local)
    else:
        local = n[..., None] - cfg.local + torch.arange(cfg.local, device=dev)
    tokens = torch.cat([sink, selected, local], dim=-1)
    ones = torch.ones(cfg.sink, dtype=torch.bool, device=dev).expand(*batch, cfg.sink)
    valid = torch.cat([ones, valid, ones.new_ones(cfg.local).expand(*batch, cfg.local)], dim=-1)
    return Scope(tokens, valid, valid.cumsum(-1) - 1)


def select_from_candidates(
    scores: torch.Tensor,
    index: torch.Tensor,
    n: int | torch.Tensor,
    cfg: ScopeConfig,
    heads: torch.Tensor | None = None,
) -> Scope:
    """Global scope from the all-gathered candidates (identical on every rank).

    Args:
        scores, index: ``[P, ..., c, H, k]`` candidates of all ranks, global indices; the dimensions
            between ``P`` and ``c`` are a batch of chunks, each selected independently.
        n: tokens in the cache including each chunk: an int, or ``[...]`` on the candidates' device,
            one per chunk of the batch.
        heads: ``[H]`` bool, this layer's retrieval heads (:func:`vote`), or None.

    Returns:
        The scope(s), ``sink + recall_clip * span + local`` entries each whatever the data.
    """
    if fuses_mass(cfg, index.shape[-3]):  # the fused masses of every rank: the best recall_clip keys
        if cfg.distinct and scores.shape[0] > 1:  # one hit per block: each rank sent its blocks' best
            scores, index = _best_per_block(scores, index, cfg)
        kept = merge_candidates(scores, index, cfg.recall_clip)[1][..., 0, 0, :]  # [..., recall_clip]
        valid = kept >= 0
    else:
        s, i = merge_candidates(scores, index, cfg.topk)
        kept, valid = vote(s, i, cfg.recall_clip, heads)
    selected, valid = widen(kept, valid, cfg.span, cfg.sink, n - cfg.local)
    return scope_of(n, cfg, selected, valid)


def _best_per_block(
    scores: torch.Tensor, index: torch.Tensor, cfg: ScopeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's mass candidates ``[P, ..., 1, 1, R]`` pooled as one rank's ``[1, ..., 1, 1, P * R]``,
    best first, with all but the best of each block of ``span`` middle tokens (by score, then the
    lower index) set to padding.

    A block whose tokens several ranks hold comes from each of them with that rank's best key; the
    global top ``R`` blocks are each in their winner's local top ``R`` (its other blocks above it
    there are above it globally too), so this merge is exact."""
    P, R = scores.shape[0], scores.shape[-1]
    s, i = sort_topk(scores.movedim(0, -2).flatten(-2), index.movedim(0, -2).flatten(-2), P * R)
    block = torch.where(i >= 0, (i - cfg.sink) // cfg.span, -1)  # [..., P * R], best first
    earlier = torch.ones(P * R, P * R, dtype=torch.bool, device=i.device).tril(-1)  # [a, b]: b before a
    repeat = ((block[..., :, None] == block[..., None, :]) & earlier).any(-1) & (i >= 0)
    s = torch.where(repeat, float("-inf"), s)
    i = torch.where(repeat, -1, i)
    return s[None], i[None]  # one "rank" holding every candidate: [1, ..., 1, 1, P * R]


def retrieves(cfg: ScopeConfig) -> bool:
    """Whether the mode picks middle tokens at all (streaming, or topk 0, is a selection with no hits)."""
    return cfg.mode == "reattention" and cfg.topk > 0


def select_scope(
    cfg: ScopeConfig,
    n: int | torch.Tensor,
    c: int,
    batch: int,
    candidates: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
    heads: torch.Tensor | None = None,
) -> Scope:
    """The scopes of a batch of chunks past the plain prefix: the one seam every mode and every step
    (prefill, plain decode, graph decode) goes through.

    Args:
        n: tokens in the cache at the end of the batch's first chunk; chunk b ends at ``n + b * c``.
            A ``[1]`` device tensor for one chunk (graph decode): then every shape is fixed and
            nothing is read on the host.
        candidates: ``(scores, index)`` ``[P, batch, c, H, k]`` of every rank, or None for a mode
            that retrieves nothing (:func:`retrieves`): then the scope is ``[sink ; local]``.
        heads: ``[H]`` bool, the layer's retrieval heads (``scope.heads``, :func:`vote`), or None.

    Returns:
        ``[batch, M]`` scopes; ``M`` is fixed by the mode and the configuration.
    """
    # (an int end is never copied to the device: that copy would wait for it)
    ends = n if batch == 1 else n + c * torch.arange(batch, device=device)
    if candidates is None and isinstance(n, torch.Tensor):  # with validity and positions, as a retrieval's
        none = torch.zeros((batch, 0), dtype=torch.long, device=device)
        return scope_of(ends, cfg, none, none.bool())
    if candidates is None:
        if batch == 1:
            local = torch.arange(n - cfg.local, n, device=device)[None]
        else:
            local = ends[:, None] - cfg.local + torch.arange(cfg.local, device=device)
        return Scope(torch.cat([torch.arange(cfg.sink, device=device).expand(batch, -1), local], dim=1))
    if batch == 0:
        m = cfg.max_scope()
        empty = torch.zeros((0, m), dtype=torch.long, device=device)
        return Scope(empty, empty.bool(), empty)
    return select_from_candidates(*candidates, ends, cfg, heads)


def scope_recall(
    selections: list[tuple[int, int, torch.Tensor]], n: int, tokens: list[int]
) -> list[float] | None:
    """How much of ``tokens`` the scopes of the step ending at ``n`` hold, per layer.

    Args:
        selections: an engine's ``(layer, n, scope tokens)`` records (``record_selection``).
        n: the step's tokens in the cache, its chunk included.
        tokens: global token indices to look for (an answer's tokens in the prompt).

    Returns:
        Per recorded layer, in layer order, the fraction of ``tokens`` in that layer's scope; None
        when no scope of that step was recorded (it attended every token, or recorded nothing).
    """
    if not tokens:
        raise ValueError("scope_recall needs at least one token to look for")
    want = torch.tensor(sorted(set(tokens)), dtype=torch.long)
    found = {
        layer: torch.isin(want, scope.long()).sum().item() / len(want)
        for layer, m, scope in selections
        if m == n
    }
    return [found[layer] for layer in sorted(found)] or None
