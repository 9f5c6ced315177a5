"""The selection probe: where the answer ranks in each head's scoring at the step that answers.

At the step whose chunk ends at the prompt's last token (the step that picks the first answer
token), for every retrieving layer and query head, :class:`SelectionProbe` ranks every middle key
``[sink, n - local)`` by the last token's score under each selection's scoring (``scope.select``:
``paper`` ``q . k``, ``qkv`` / ``qkv2`` keys weighted by their value's L1 / L2 norm, ``qk_pe`` RoPE
at the fixed distance ``local``) and records the rank of the best *target* key: a key whose span
(``[j - span//2, j - span//2 + span)``, as the selection widens a hit) reaches a token of the
answer. Rank 0 is the top; a rank below ``topk`` means the last token's own top-k already brings
the answer into scope. Ties count in the target's favour (rank = keys scoring strictly higher).

One process only (the whole cache is this rank's); the scores are computed in fp32 from the cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import SCORE_NORMS, SELECTIONS, ScopeConfig
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

    def __init__(self, n_last: int, answer: list[int], scope: ScopeConfig, selections=SELECTIONS):
        self.n_last, self.scope, self.selections = n_last, scope, tuple(selections)
        self.targets = torch.tensor(span_targets(answer, scope.span), dtype=torch.long)
        self.ranks: dict[str, list[list[int] | None]] = {s: [] for s in self.selections}
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
        for name in self.selections:
            if t.numel() == 0:
                self.ranks[name].append(None)
                continue
            k = keys
            if name in SCORE_NORMS:
                k = keys * torch.linalg.vector_norm(values, SCORE_NORMS[name], dim=-1, keepdim=True)
            query = Scoring.of(replace(cfg, select=name), engine.rope_table).query(q[b, -1].float())  # [H, d]
            group = query.shape[0] // k.shape[1]
            s = torch.einsum("hgd,nhd->hgn", query.unflatten(0, (-1, group)), k).flatten(0, 1)  # [H, N]
            best = s[:, t].amax(dim=1, keepdim=True)  # [H, 1]
            self.ranks[name].append((s > best).sum(dim=1).tolist())


def summarize(ranks: list[list[int] | None], topk: int) -> dict:
    """Per-sample summary of one scoring's ranks: hit fraction (rank < topk) over (layer, head), median."""
    flat = [r for layer in ranks if layer is not None for r in layer]
    if not flat:
        return {"hit": None, "median": None}
    t = torch.tensor(flat, dtype=torch.float64)
    return {"hit": round(float((t < topk).double().mean()), 4), "median": float(t.median())}
