"""Model loading and the per-architecture adapter: the only place that imports transformers
(imported lazily, so ``import dist_reattn.models`` stays cheap)."""

from .spec import SUPPORTED_ARCHS, ModelSpec

__all__ = ["SUPPORTED_ARCHS", "ModelSpec"]
