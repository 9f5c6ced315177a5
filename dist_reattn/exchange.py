"""Every composite data movement of the engine, with the communicator, cache and layout passed in.

Per layer and step (DESIGN "Distributed dataflow"):

* :func:`slab_qkv` (sequence groups) or :func:`all_heads` (tensor parallelism): q, k, v of every
  token and head of the step on every rank, for the scoring and the owners' appends;
* :func:`route_candidates`: each rank's local top-k of every chunk goes to the rank that attends
  the chunk (``all_to_all``), or to every rank when every rank attends every chunk (``all_gather``);
* :func:`fetch_rows`: the owners send only the selected rows of a scope, compacted to a bound that
  holds for any selection (:func:`fetch_capacity`), to the ranks that attend it (``all_to_all``);
* :func:`merge_across`: decode's per-owner attention partials, merged by log-sum-exp.

Every buffer has a shape fixed by the configuration, never by the data, so no exchange waits on
the host for a count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import merge_partials
from .cache import KVCache
from .distributed import Comm


@dataclass(frozen=True)
class Part:
    """Which rank attends which chunk of one step.

    Attributes:
        chunks: ``(offset, size)`` of every chunk of the step, in order.
        owner: the rank that runs each chunk (norms, projections, MLP, selection, attention), or
            None when every rank runs every chunk (one rank, tensor parallelism, decode, full mode,
            or fewer chunks than ranks).
        rank, world: this rank and the group size.
    """

    chunks: tuple[tuple[int, int], ...]
    owner: tuple[int, ...] | None
    rank: int
    world: int

    @classmethod
    def of_step(cls, c: int, chunk: int, rank: int, world: int, split: bool) -> Part:
        """The chunks of a ``c``-token step; with ``split`` and at least one chunk per rank,
        contiguous runs of chunks go to ranks in order (chunk i to rank ``i * P // chunks``)."""
        chunks = tuple((off, min(chunk, c - off)) for off in range(0, c, chunk))
        owner = None
        if split and world > 1 and len(chunks) >= world:
            owner = tuple(i * world // len(chunks) for i in range(len(chunks)))
        return cls(chunks, owner, rank, world)

    @property
    def split(self) -> bool:
        return self.owner is not None

    def span(self, rank: int | None = None) -> tuple[int, int]:
        """Token offsets ``[a, b)`` of the step that ``rank`` runs (the whole step when not split)."""
        if self.owner is None:
            return 0, self.chunks[-1][0] + self.chunks[-1][1]
        rank = self.rank if rank is None else rank
        mine = [ch for ch, r in zip(self.chunks, self.owner, strict=True) if r == rank]
        return mine[0][0], mine[-1][0] + mine[-1][1]

    def counts(self) -> list[int]:
        """Tokens each rank runs."""
        return [b - a for a, b in (self.span(r) for r in range(self.world))]

    def owners_in(self, first: int, count: int) -> list[int]:
        """Chunks of the run ``[first, first + count)`` that each rank attends."""
        assert self.owner is not None
        run = self.owner[first : first + count]
        return [run.count(r) for r in range(self.world)]

    def mine_in(self, first: int, count: int) -> tuple[int, int]:
        """This rank's chunks ``[b0, b1)`` of the run ``[first, first + count)``, relative to ``first``."""
        if self.owner is None:
            return 0, count
        run = self.owner[first : first + count]
        n = run.count(self.rank)
        b0 = run.index(self.rank) if n else sum(1 for r in run if r < self.rank)
        return b0, b0 + n


def slab_qkv(comm: Comm, counts: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v of every token of a step split over sequence groups, on every rank.

    Args:
        counts: tokens each rank ran (rank order is token order).
        q: ``[H, c_r, d]``; k, v: ``[Hkv, c_r, d]``, this rank's tokens, every head.

    Returns:
        ``[H, c, d]``, ``[Hkv, c, d]``, ``[Hkv, c, d]`` for the whole step.
    """
    H, Hkv = q.shape[0], k.shape[0]
    width = max(counts)
    x = torch.cat([q, k, v])  # [H + 2 Hkv, c_r, d]
    if x.shape[1] < width:
        x = torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], x.shape[2]))], dim=1)
    every = comm.all_gather(x, "qkv_slab")  # [P, H + 2 Hkv, width, d]
    if all(n == width for n in counts):
        x = every.transpose(0, 1).flatten(1, 2)
    else:
        x = torch.cat([every[r, :, :n] for r, n in enumerate(counts)], dim=1)
    return x[:H], x[H : H + Hkv], x[H + Hkv :]


def all_heads(comm: Comm, layout: list[tuple[int, int]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v of every head under tensor parallelism: each rank's ``[h, c, d]`` pieces in one collective.

    Args:
        layout: (query heads, KV heads) of every rank, in rank order (uneven counts are padded to
            the widest rank for the collective).
    """
    width = max(hq + 2 * hkv for hq, hkv in layout)
    x = torch.cat([q, k, v])  # [hq + 2 hkv, c, d]
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    every = comm.all_gather(x, "qkv_heads")  # [P, width, c, d]
    qs = [every[r, :hq] for r, (hq, _) in enumerate(layout)]
    ks = [every[r, hq : hq + hkv] for r, (hq, hkv) in enumerate(layout)]
    vs = [every[r, hq + hkv : hq + 2 * hkv] for r, (hq, hkv) in enumerate(layout)]
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def route_candidates(
    comm: Comm, per_rank: list[int] | None, scores: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's local top-k of a run of chunks, delivered to the ranks that select for them.

    Scores (fp32, sent as their bits) and global indices (< 2**31) travel as one int32 tensor.

    Args:
        per_rank: chunks of the run each rank attends (contiguous, in rank order), or None when
            every rank attends every chunk.
        scores, index: ``[B, c, H, k]`` this rank's candidates for every chunk of the run.

    Returns:
        ``(scores, index)``, ``[P, B_mine, c, H, k]``: every rank's candidates for this rank's chunks.
    """
    if comm.world == 1:  # nothing to send: no packing either (graph decode replays every op here)
        return scores[None], index[None]
    packed = torch.stack([scores.contiguous().view(torch.int32), index.to(torch.int32)], dim=1)
    if per_rank is None:
        every = comm.all_gather(packed, "topk_candidates")  # [P, B, 2, c, H, k]
    else:
        width = max(per_rank)
        if all(n == width for n in per_rank):
            send = packed.unflatten(0, (comm.world, width))
        else:
            send = packed.new_zeros((comm.world, width, *packed.shape[1:]))
            b = 0
            for r, n in enumerate(per_rank):
                send[r, :n] = packed[b : b + n]
                b += n
        every = comm.all_to_all(send, "topk_candidates")[:, : per_rank[comm.rank]]
    return every[:, :, 0].view(torch.float32), every[:, :, 1].long()


def fetch_capacity(length: int, runs: int, page: int, world: int) -> int:
    """Most rows of a list that any one rank owns, for a list of at most ``length`` distinct tokens
    in at most ``runs`` runs of consecutive tokens, pages of ``page`` tokens striped over ``world``.

    In a run of ``L`` consecutive tokens a rank owns whole pages of every ``world`` consecutive
    pages: at most ``page * ceil(L / (page * world)) <= L / world + page`` tokens. Summed over the
    runs: ``length / world + runs * page``, and never more than ``length``.
    """
    return max(1, min(length, math.ceil(length / world) + runs * page))


def fetch_rows(
    comm: Comm,
    cache: KVCache,
    layer: int,
    lists: torch.Tensor,
    *,
    capacity: int,
    gathered: bool,
    heads: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows of global tokens from the ranks that own them: each owner sends only its rows.

    Each owner finds the rows it holds of every requesting rank's lists, keeps them in list order
    (a stable sort puts them first) and sends the first ``capacity`` of each list; the requester
    puts each row back at its place in the list. ``capacity`` must bound the rows one rank owns of
    one list (:func:`fetch_capacity`): the exchange is then exact whatever was selected.

    Args:
        lists: ``[B, T]`` global tokens this rank needs per chunk, -1 for none.
        gathered: the ranks' lists differ (sequence groups; then every rank passes the same ``B``,
            padded with -1 rows) and are all-gathered first; False: every rank passes the same lists.
        heads: each rank's ``(first, count)`` KV heads (tensor parallelism), or None for every head.

    Returns:
        k, v ``[B, T, h, d]`` for this rank's KV heads; rows where ``lists`` is -1 hold garbage.
    """
    P, (B, T) = comm.world, lists.shape
    if P == 1:
        rows = lists.clamp(min=0)
        return cache.k[layer, rows], cache.v[layer, rows]
    if gathered:
        every = comm.all_gather(lists.to(torch.int32), "scope_lists").long()  # [P, B, T]
    else:
        every = lists[None].expand(P, B, T)
    owned = (every >= 0) & cache.owned_mask(every)
    keep = (~owned).to(torch.int8).sort(dim=-1, stable=True).indices[..., :capacity]  # owned first, in order
    rows = cache.to_local(every.gather(-1, keep).clamp(min=0)).clamp(max=cache.local_capacity - 1)
    kv = torch.stack([cache.k[layer, rows], cache.v[layer, rows]], dim=3)  # [P, B, C, 2, Hkv, d]
    if heads is not None:
        width = max(h for _, h in heads)
        kv = torch.stack(
            [_pad_heads(kv[r, ..., h0 : h0 + h, :], width) for r, (h0, h) in enumerate(heads)]
        )  # [P, B, C, 2, width, d]: each receiver's heads
    recv = comm.all_to_all(kv, "scope_kv")  # [P (owner), B, C, 2, width, d]
    # Where each entry of this rank's lists arrived: its owner's slice, at its rank among the
    # entries of that owner in list order.
    valid = lists >= 0
    owner = cache.owner_of(lists.clamp(min=0))  # [B, T]
    onehot = torch.nn.functional.one_hot(owner, P) & valid[..., None]  # [B, T, P]
    slot = onehot.cumsum(1).gather(-1, owner[..., None])[..., 0] - 1
    flat = (owner * B + torch.arange(B, device=lists.device)[:, None]) * capacity + slot.clamp(
        0, capacity - 1
    )
    out = recv.flatten(0, 2)[flat]  # [B, T, 2, width, d]
    h = cache.k.shape[2] if heads is None else heads[comm.rank][1]
    return out[..., 0, :h, :], out[..., 1, :h, :]


def _pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """Pads the heads dimension (second to last) of ``x`` with zeros to ``width``."""
    if x.shape[-2] == width:
        return x
    return torch.cat([x, x.new_zeros((*x.shape[:-2], width - x.shape[-2], x.shape[-1]))], dim=-2)


def merge_across(comm: Comm, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Decode attention from every rank's per-owner partials (``out [H, d]``, ``lse [H]`` fp32, of
    :func:`~dist_reattn.attention.partial_attention`): one all-gather of ``[H, d + 1]``, merged
    exactly by log-sum-exp. Returns ``[H, d]`` fp32 (one rank: ``out``)."""
    if comm.world == 1:
        return out
    every = comm.all_gather(torch.cat([out, lse[:, None]], dim=1), "decode_partials")  # [P, H, d + 1]
    return merge_partials(every[..., :-1], every[..., -1])
