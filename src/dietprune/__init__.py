"""dietprune: training-free dimension-wise global pruning of LLMs (DIET)."""

__version__ = "0.1.0"
