"""dist_reattn: ReAttention (training-free finite-scope attention) for Hugging Face decoders,
sequence-sharded across ranks. Importing this package has no side effects.

    import dist_reattn
    llm = dist_reattn.load("smollm2-135m")
    print(llm.generate("Who wrote Hamlet?").text)
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # load() brings torch and transformers: imported on first use, so `import dist_reattn` stays cheap.
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'dist_reattn' has no attribute {name!r}")
