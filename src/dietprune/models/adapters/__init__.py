"""Architecture registry: model_type -> Adapter, one module per architecture in this package (each
defines ADAPTER). The algorithms never branch on model names."""

from __future__ import annotations

import importlib
import pkgutil

from dietprune.errors import DietError
from dietprune.models.adapters.base import Adapter, SubBlock

ADAPTERS: dict[str, Adapter] = {
    model_type: adapter
    for info in pkgutil.iter_modules(__path__) if info.name != "base"
    for adapter in [importlib.import_module(f"{__name__}.{info.name}").ADAPTER]
    for model_type in adapter.model_types
}


def adapter_for(config) -> Adapter:
    """The adapter for a model config; a one-line error names the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise DietError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "Adapter", "SubBlock", "adapter_for"]
