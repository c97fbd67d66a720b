"""Architecture registry: model_type -> Adapter. The algorithm never branches on model names."""

from __future__ import annotations

from dietprune.errors import DietError
from dietprune.models.adapters import gemma, gemma2, gemma3, llama, mistral, qwen2, qwen3
from dietprune.models.adapters.base import Adapter

ADAPTERS: dict[str, Adapter] = {
    model_type: module.ADAPTER
    for module in (gemma, gemma2, gemma3, llama, mistral, qwen2, qwen3)
    for model_type in module.ADAPTER.model_types
}


def adapter_for(config) -> Adapter:
    """The adapter for a model config; a one-line error names the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise DietError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
