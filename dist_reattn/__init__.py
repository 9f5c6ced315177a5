"""dist_reattn: ReAttention (training-free finite-scope attention) for Hugging Face decoders,
sequence-sharded across ranks. Importing this package has no side effects."""

__version__ = "0.1.0"
