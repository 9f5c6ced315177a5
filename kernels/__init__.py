"""Triton kernels of dist_reattn, installed as ``dist_reattn.kernels``.

Each kernel comes in three layers: the ``@triton.jit`` kernel, an asserting launcher, and a
pure-torch ``*_ref`` that defines what the kernel computes. Nothing here imports the rest of
dist_reattn. The score + top-k kernel is split by algorithm: ``ref.py``, ``one_pass.py``,
``two_pass.py``, ``merge.py`` (``common.py`` what they share), and ``score_topk.py``, the exact
launcher; ``_variants.py`` reaches other configurations, for benchmarks and tests only. ``fp8.py``
is the approximate path (tiles chosen by FP8 scores, rescored exactly; reference in ``ref.py``).
"""

from .fp8 import check_fp8, fold_query, key_center, key_scale, quantize_keys, score_topk_fp8, supports_fp8
from .merge import sort_topk
from .ref import score_topk_fp8_ref, score_topk_ref
from .score_topk import MAX_TOPK, score_topk, supports

__all__ = ["MAX_TOPK", "check_fp8", "fold_query", "key_center", "key_scale", "quantize_keys", "score_topk", "score_topk_fp8",
           "score_topk_fp8_ref", "score_topk_ref", "sort_topk", "supports", "supports_fp8"]  # fmt: skip
