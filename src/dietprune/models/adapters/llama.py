"""Llama (and SmolLM2): pre-norm blocks, two residual norms per layer, SwiGLU MLP."""

from dietprune.models.adapters.base import Adapter

ADAPTER = Adapter(name="llama", model_types=("llama",))
