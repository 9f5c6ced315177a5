"""Triton kernels of dist_reattn, installed as ``dist_reattn.kernels``.

Each kernel comes in three layers: the ``@triton.jit`` kernel, an asserting launcher, and a
pure-torch ``*_ref`` that defines what the kernel computes. Nothing here imports the rest of
dist_reattn.
"""

from .score_topk import score_topk, score_topk_ref, sort_topk, supports

__all__ = ["score_topk", "score_topk_ref", "sort_topk", "supports"]
