"""Triton kernels of dist_reattn, installed as ``dist_reattn.kernels``.

Each kernel comes in three layers: the ``@triton.jit`` kernel, an asserting launcher, and a
pure-torch ``*_ref`` that defines what the kernel computes. Nothing here imports the rest of
dist_reattn. The score + top-k kernel is split by algorithm: ``ref.py``, ``one_pass.py``,
``two_pass.py``, ``merge.py`` (``common.py`` what they share), and ``score_topk.py``, the exact
launcher; ``_variants.py`` reaches other configurations, for benchmarks and tests only.
"""

from .merge import sort_topk
from .ref import score_topk_ref
from .score_topk import MAX_TOPK, score_topk, supports

__all__ = ["MAX_TOPK", "score_topk", "score_topk_ref", "sort_topk", "supports"]
