"""The selection probe: where the answer ranks in each head's scoring at the step that answers.

At the step whose chunk ends at the prompt's last token (the step that picks the first answer
token), for every retrieving layer and query head, :class:`SelectionProbe` ranks every middle key
``[sink, n - local)`` by the last token's score under each selection's scoring (``scope.select``:
``paper`` ``q . k``, ``qkv`` / ``qkv2`` keys weighted by their value's L1 / L2 norm, ``qk_pe`` RoPE
at the fixed distance ``local``) and records the rank of the best *target* key: a key whose span
(``[j - span//2, j - span//2 + span)``, as the selection widens a hit) reaches a token of the
answer. Rank 0 is the top; a rank below ``topk`` means the last token's own top-k already brings
the answer into scope. Ties count in the target's favour (rank = keys scoring strictly higher).

A block scoring is ranked as well, for the block-selection candidates (InfLLM's representative keys,
MoBA's mean-pooled blocks): ``block_mean`` scores each aligned block of ``span`` middle keys by the
query against the block's mean key, and records the rank of the best block holding an answer token
among the blocks (rank < topk: the answer's block would be among the top-k blocks).

Fused rankings ask whether the heads *together* rank the answer better than any one of them, the
premise of a scope shared across heads and layers (OmniKV's choice of one scope from a few layers).
Under the paper's scoring, every head's scores over the middle keys are standardised (``z``: minus
the head's mean, over its standard deviation) or turned into attention weights (``p``: softmax of
``s / sqrt(d)``) and summed over the layer's query heads (``zsum``, ``psum``) and over every layer
probed so far at this step, this one included (``zsum_upto``, ``psum_upto``). ``fused[name]`` holds one
rank per layer; a rank below ``recall_clip`` means a scope of the best ``recall_clip`` fused keys
(widened by the span) would hold the answer.

One process only (the whole cache is this rank's); the scores are computed in fp32 from the cache.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .cache import score_keys
from .config import SCORE_NORMS, SCORINGS, ScopeConfig
from .select import Scoring


def span_targets(answer: list[int], span: int) -> list[int]:
    """The keys whose widened span ``[j - span//2, j - span//2 + span)`` holds a token of ``answer``."""
    lo, hi = span - span // 2 - 1, span // 2  # j reaches t when t - hi <= j <= t + lo
    return sorted({j for t in answer for j in range(t - lo, t + hi + 1)})


class SelectionProbe:
    """Ranks of the answer in every head's scoring at one step (see the module docstring).

    Args:
        n_last: the prompt's length: the step whose chunk ends there is probed.
        answer: global indices of the answer's tokens in the prompt.
        scope: the scope settings in force (sink, local, span).
        selections: the scorings to rank under (default: every ``scope.select``).

    After the step, ``ranks[name]`` is ``[layers][H]`` (int, or None for a layer whose middle holds no
    target: the answer is in the sink or the local window), layers in the order they ran.
    """

    def __init__(self, n_last: int, answer: list[int], scope: ScopeConfig, selections=SCORINGS):
        self.n_last, self.scope, self.selections = n_last, scope, tuple(selections)
        self.targets = torch.tensor(span_targets(answer, scope.span), dtype=torch.long)
        self.answer = torch.tensor(sorted(set(answer)), dtype=torch.long)
        self.ranks: dict[str, list[list[int] | None]] = {s: [] for s in (*self.selections, "block_mean")}
        self.fused: dict[str, list[int | None]] = {f: [] for f in FUSED}
        self._upto: dict[str, torch.Tensor] = {}
        self.middle = 0

    def __call__(self, engine, layer: int, q: torch.Tensor, n: int) -> None:
        """``Engine.probe``'s hook: ``q [B, c, H, d]`` un-rotated queries of chunks ending at ``n + b * c``."""
        B, c = q.shape[:2]
        b, off = divmod(self.n_last - n, c)
        if off or not 0 <= b < B:
            return
        cache, cfg = engine.cache, self.scope
        assert cache.world == 1, "the selection probe reads the whole cache: one process only"
        lo, hi = cfg.sink, self.n_last - cfg.local
        self.middle = hi - lo
        keys = cache.k[layer, lo:hi].float()  # [N, Hkv, d]
        self._head_dim = keys.shape[-1]
        values = cache.v[layer, lo:hi].float()
        t = self.targets[(self.targets >= lo) & (self.targets < hi)].to(keys.device) - lo
        if t.numel() == 0:  # the answer is in the sink or the local window
            for ranks in (*self.ranks.values(), *self.fused.values()):
                ranks.append(None)
            return
        for name in self.selections:
            k = score_keys(keys, values, SCORE_NORMS[name]) if name in SCORE_NORMS else keys
            query = Scoring.of(replace(cfg, select=name), engine.rope_table).query(q[b, -1].float())  # [H, d]
            scores = _scores(query, k)  # [H, N]
            self.ranks[name].append(_rank(scores, t))
            if name == "paper":
                self._fuse(scores, t)
        # block_mean: aligned blocks of span keys (a ragged last block averages what it has)
        blocks = -(-(hi - lo) // cfg.span)
        block_of = torch.arange(hi - lo, device=keys.device) // cfg.span  # [N]
        sums = keys.new_zeros((blocks, *keys.shape[1:])).index_add_(0, block_of, keys)
        means = sums / torch.bincount(block_of, minlength=blocks)[:, None, None]  # [blocks, Hkv, d]
        a = self.answer[(self.answer >= lo) & (self.answer < hi)].to(keys.device) - lo
        if a.numel() == 0:
            self.ranks["block_mean"].append(None)
        else:
            self.ranks["block_mean"].append(_rank(_scores(q[b, -1].float(), means), block_of[a].unique()))

    def _fuse(self, scores: torch.Tensor, t: torch.Tensor) -> None:
        """Appends this layer's fused ranks (module docstring) from its paper scores ``[H, N]``."""
        d = self._head_dim
        per_head = {
            "z": (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6),
            "p": torch.softmax(scores / math.sqrt(d), dim=1),
        }
        for kind, x in per_head.items():
            layer = x.sum(0, keepdim=True)  # [1, N]
            upto = self._upto[kind] = layer if kind not in self._upto else self._upto[kind] + layer
            self.fused[f"{kind}sum"].append(_rank(layer, t)[0])
            self.fused[f"{kind}sum_upto"].append(_rank(upto, t)[0])


# The fused rankings (see the module docstring), one rank per layer.
FUSED = ("zsum", "zsum_upto", "psum", "psum_upto")


def _scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[H, N]`` scores of ``query [H, d]`` against ``keys [N, Hkv, d]`` (query head h reads KV head h // group)."""
    group = query.shape[0] // keys.shape[1]
    return torch.einsum("hgd,nhd->hgn", query.unflatten(0, (-1, group)), keys).flatten(0, 1)


def _rank(scores: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Per row of ``scores [H, N]``: how many entries score strictly above the best of ``targets``."""
    best = scores[:, targets].amax(dim=1, keepdim=True)  # [H, 1]
    return (scores > best).sum(dim=1).tolist()
