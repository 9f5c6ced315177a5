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
from .select import FP8_SAMPLE_EVERY, Scoring, local_topk, select_from_candidates


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
                self._fuse(scores, t, keys.shape[-1])
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

    def _fuse(self, scores: torch.Tensor, t: torch.Tensor, d: int) -> None:
        """Appends this layer's fused ranks (module docstring) from its paper scores ``[H, N]``
        (head dimension ``d``)."""
        per_head = {
            "z": (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6),
            "p": torch.softmax(scores / math.sqrt(d), dim=1),
        }
        for kind, x in per_head.items():
            layer = x.sum(0, keepdim=True)  # [1, N]
            upto = self._upto[kind] = layer if kind not in self._upto else self._upto[kind] + layer
            self.fused[f"{kind}sum"].append(_rank(layer, t)[0])
            self.fused[f"{kind}sum_upto"].append(_rank(upto, t)[0])


class ScoringAudit:
    """How far ``scope.scoring=fp8`` moves the selection from exact, on a run's own queries and keys,
    for several margins at once (``launch/ruler.py --fp8-audit``).

    On every ``every``-th chunk of a prefill (chunks whose end is a multiple of ``every * chunk``
    tokens; steps of one token are left out), every retrieving layer, it computes the exact top-k of
    every query row and head and, per margin, the FP8-chosen top-k (the kernel on a GPU, the
    reference elsewhere) over the same middle keys, then each one's scope (votes, clip, spans, as
    :func:`~dist_reattn.select.select_from_candidates`). It counts rows whose top-k index set is the
    exact one and sums the Jaccard overlap of the scope's middle tokens with the exact scope's.

    The run itself selects as its scope says; the audit only reads. One process only (it reads the
    whole cache), and the cache must keep FP8 keys (the engine built for ``scoring=fp8``).

    After the run, :meth:`summary` gives per margin ``rows_equal`` (fraction of rows), ``jaccard``
    (mean over audited scopes) and ``jaccard_min``, with the counts behind them.
    """

    def __init__(self, margins: list[int], every: int = FP8_SAMPLE_EVERY):
        self.margins, self.every = list(margins), every
        self.rows = 0
        self.scopes = 0
        self.equal = dict.fromkeys(self.margins, 0)
        self.jaccard = dict.fromkeys(self.margins, 0.0)
        self.jaccard_min = dict.fromkeys(self.margins, 1.0)

    def __call__(self, engine, layer: int, q: torch.Tensor, n: int) -> None:
        """``Engine.probe``'s hook: ``q [B, c, H, d]`` un-rotated queries of chunks ending at ``n + b * c``."""
        B, c = q.shape[:2]
        cache, cfg = engine.cache, engine.scope
        assert cache.world == 1, "the FP8 audit reads the whole cache: one process only"
        assert cache.k8 is not None, "the FP8 audit needs the cache's FP8 keys: build for scope.scoring=fp8"
        period = self.every * cfg.chunk
        if c == 1:
            return
        keys, k8, scale = cache.score_k[layer], cache.k8[layer], cache.k_scale[layer]
        for b in range(B):
            end = n + b * c
            if end % period:
                continue
            lo, hi = cache.local_rows(cfg.sink, end - cfg.local)
            query = engine.scoring.query(q[b])  # [c, H, d]
            exact = local_topk(query, keys, lo, hi, cfg.topk)
            chosen = _middle(
                select_from_candidates(exact[0][None], exact[1][None], end, cfg, engine.heads[layer]), cfg
            )
            want = exact[1].sort(-1).values
            self.rows += want.shape[0] * want.shape[1]
            self.scopes += 1
            for m in self.margins:
                got = local_topk(query, keys, lo, hi, cfg.topk, (k8, scale, m))
                self.equal[m] += int((got[1].sort(-1).values == want).all(-1).sum())
                scope = _middle(
                    select_from_candidates(got[0][None], got[1][None], end, cfg, engine.heads[layer]), cfg
                )
                union = torch.cat([chosen, scope]).unique().numel()
                j = 1.0 if union == 0 else torch.isin(scope, chosen).sum().item() / union
                self.jaccard[m] += j
                self.jaccard_min[m] = min(self.jaccard_min[m], j)

    def summary(self) -> dict[str, dict]:
        """Per margin (keys as strings, for JSON): rows_equal, jaccard, jaccard_min, rows, scopes."""
        return {
            str(m): {
                "rows_equal": self.equal[m] / max(self.rows, 1),
                "jaccard": self.jaccard[m] / max(self.scopes, 1),
                "jaccard_min": self.jaccard_min[m],
                "rows": self.rows,
                "scopes": self.scopes,
            }
            for m in self.margins
        }


def _middle(scope, cfg: ScopeConfig) -> torch.Tensor:
    """The selected middle tokens of one scope (its sink and local window left out)."""
    tokens = scope.selected()
    return tokens[cfg.sink : tokens.numel() - cfg.local]


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
