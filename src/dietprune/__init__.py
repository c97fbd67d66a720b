"""dietprune: training-free dimension-wise global pruning of LLMs (DIET).

    import dietprune
    pruned = dietprune.prune("gemma-3-270m", sparsity=0.2)   # a name, or (model, tokenizer)
    dietprune.save(pruned, "out/pruned")
    results = dietprune.evaluate(pruned, limit=100)
"""

from dietprune.version import __version__

_API = ("load", "profile", "prune", "save", "evaluate", "run")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:  # torch and transformers load on first use, not on `import dietprune`
        from dietprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'dietprune' has no attribute {name!r}")
