"""dietprune: training-free dimension-wise global pruning of LLMs (DIET).

    import dietprune
    pruned = dietprune.prune("gemma-3-270m", sparsity=0.2)   # a name, or (model, tokenizer)
    dietprune.save(pruned, "out/pruned")
    results = dietprune.evaluate(pruned, limit=100)
"""

import sys
from types import ModuleType

from dietprune.version import __version__

_API = ("load", "profile", "prune", "save", "evaluate", "run")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:  # torch and transformers load on first use, not on `import dietprune`
        from dietprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'dietprune' has no attribute {name!r}")


class _Package(ModuleType):
    """The package, whose `profile` and `evaluate` stay the API functions: importing the submodules of
    those names (which the API does) would otherwise set them as the package's attributes, in place of
    the functions (`from dietprune.evaluate import ...` still finds the submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _API and isinstance(value, ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
