"""A private entry point to the score + top-k kernels under other configurations than the default.

For benchmarks (``launch/bench_topk.py``) and tests only: nothing in dist_reattn imports this module,
and the engine's :func:`~.score_topk.score_topk` takes no configuration. Inputs as there: ``q``
[c, H, d], ``k`` [N, Hkv, d], results ``[c, H, topk]``.

:func:`score_topk_variant` runs exact variants, the same results up to the rounding of another
summation order (tiles, warps, stages, split count, path, merge, the two-pass filters 0 and 1).
Only with ``inexact=True`` does it also run the two same-run benchmark baselines that return WRONG
results by design: ``SCORE_ONLY`` (one-pass scores and a row max, no top-k) and ``FILTER`` 2
(session 4's ``s >= tau`` filter, which can drop a winner: DESIGN.md section 7).

:func:`score_topk_fp8_variant` does the same for the approximate FP8 path (:mod:`.fp8`), and can
return the tiles pass 1 chose.
"""

from __future__ import annotations

import torch

from .fp8 import MAX_KEEP, _check_fp8_inputs, _fp8_two_pass, check_fp8, fp8_config, fp8_picks
from .score_topk import _check_inputs, _launch, default_config

CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "MERGE", "SCORE_ONLY", "TWO_PASS",
               "BLOCK_M2", "num_warps2", "num_stages2", "FILTER"}  # fmt: skip


def _is_inexact(config: dict | None) -> bool:
    """Whether ``config`` asks for a baseline that returns wrong results (``SCORE_ONLY``, ``FILTER`` 2)."""
    config = config or {}
    return bool(config.get("SCORE_ONLY")) or config.get("FILTER") == 2


def score_topk_variant(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    end: int | torch.Tensor,
    topk: int,
    *,
    splits: int | None = None,
    config: dict | None = None,
    inexact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.score_topk.score_topk` with ``config`` over its defaults.

    Args:
        q, k, start, end, topk: as for :func:`~.score_topk.score_topk`.
        splits: key-range splits per row block (default: enough to fill the GPU).
        config: overrides: ``BLOCK_M``, ``BLOCK_N`` (<= 256), ``num_warps``, ``num_stages``;
            ``TWO_PASS`` (topk <= 4 only: tile maxima first, then an exact top-k over the tiles
            that can hold a winner; the prefill default), with ``BLOCK_M2``, ``num_warps2`` and
            ``num_stages2`` for its second pass and ``FILTER`` for what the second pass merges (0,
            the default: all keys of all listed tiles; 1: a row takes all keys of its own k picked
            tiles and the keys of its block's other listed tiles that score at least its bound
            ``tau``; both exact, see :func:`~.two_pass._two_pass`); for the one-pass kernel
            ``MERGE`` (0: one packed pass finds the single entry above a row's threshold, the
            default; 1: two passes).
        inexact: also take the baselines whose results are WRONG by design, for same-run
            benchmarks and for tests that show a bug: ``SCORE_ONLY`` (one-pass: scores and a row
            max only, the benchmark floor; the results are meaningless) and ``FILTER`` 2 (two-pass:
            only keys at or above ``tau``, session 4's filter; drops winners that pass 2 scores a
            few ulps below pass 1). Without it they are refused.

    Returns:
        ``(scores, index)``: ``[c, H, topk]`` fp32 and int64.
    """
    assert inexact or not _is_inexact(config), f"{config} returns wrong results: pass inexact=True"
    _check_inputs(q, k, start, end, topk)
    c, H, d = q.shape
    on_device = isinstance(end, torch.Tensor)
    two_pass = False if on_device else (config or {}).get("TWO_PASS")
    cfg = {**default_config(H // k.shape[1] * c, d, topk, two_pass), **(config or {})}
    unknown = set(cfg) - CONFIG_KEYS
    assert not unknown, f"unknown config keys: {sorted(unknown)}"
    assert cfg["BLOCK_N"] <= 256, (
        f"BLOCK_N {cfg['BLOCK_N']} > 256: the packed count/column sum would overflow"
    )
    if cfg.get("TWO_PASS"):
        assert not on_device, "TWO_PASS needs a host end row: a device end takes the one-pass path"
        assert topk <= 4, f"TWO_PASS keeps four tile maxima per row: topk {topk} > 4"
        assert not cfg.get("SCORE_ONLY"), "SCORE_ONLY is a one-pass option: add TWO_PASS=False"
        assert cfg.get("FILTER", 0) in (0, 1, 2), f"FILTER is 0, 1 or 2, got {cfg.get('FILTER')}"
    else:
        assert "FILTER" not in cfg, "FILTER is a two-pass option: add TWO_PASS=True (topk <= 4)"
    return _launch(q, k, start, end, topk, splits, cfg)


FP8_CONFIG_KEYS = {
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "GATE",
    "PIPE",
    "FLOOR",
    "BLOCK_M2",
    "num_warps2",
    "num_stages2",
}


def score_topk_fp8_variant(
    q: torch.Tensor,
    k: torch.Tensor,
    k8: torch.Tensor,
    scale: torch.Tensor,
    start: int,
    end: int,
    topk: int,
    margin: int,
    *,
    splits: int | None = None,
    config: dict | None = None,
    return_picks: bool = False,
    inexact: bool = False,
):
    """:func:`~.fp8.score_topk_fp8` with ``config`` over :func:`~.fp8.fp8_config`.

    Args:
        q, k, k8, scale, start, end, topk, margin: as for :func:`~.fp8.score_topk_fp8`.
        splits: key-range splits per row block of pass 1 (default: enough to fill the GPU).
        config: overrides: ``BLOCK_M``, ``num_warps``, ``num_stages`` (pass 1), ``GATE`` (pass 1
            inserts only when some row of the block gains: 1; always: 0), ``PIPE`` (pass 1 issues
            the next tile's dot before this tile's list update: 1; in turn: 0), ``FLOOR`` (pass 1
            keeps only a running row maximum: the benchmark floor, WRONG results), ``BLOCK_M2``,
            ``num_warps2``, ``num_stages2`` (plan and pass 2). ``BLOCK_N`` stays ``FP8_TILE``.
        return_picks: also return each row's chosen tiles, ``[c, H, topk + margin]`` int64 (-1 for
            none), ordered by pass 1's maxima descending, then tile ascending.
        inexact: also take ``FLOOR`` (results WRONG by design, for same-run benchmarks only).

    Returns:
        ``(scores, index)`` ``[c, H, topk]``, and the picks if asked.
    """
    assert inexact or not (config or {}).get("FLOOR"), f"{config} returns wrong results: pass inexact=True"
    check_fp8(q.device)
    _check_fp8_inputs(q, k, k8, scale, start, end, topk, margin)
    c, H, d = q.shape
    cfg = {**fp8_config(H // k.shape[1] * c, d), **(config or {})}
    unknown = set(cfg) - FP8_CONFIG_KEYS
    assert not unknown, f"unknown config keys: {sorted(unknown)}"
    assert topk + margin <= MAX_KEEP
    v, i, plan = _fp8_two_pass(q, k, k8, scale, start, end, topk, margin, splits, cfg)
    if return_picks:
        return v, i, fp8_picks(plan[1], c, H, topk + margin)
    return v, i
