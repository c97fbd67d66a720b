"""Pruning methods: DIET, its ablations and the baselines, one module each in this package (each
defines METHOD; see base.py for the two kinds). Adding a method is adding a module."""

from __future__ import annotations

import importlib
import pkgutil

from dietprune.errors import DietError
from dietprune.methods.base import Method

METHODS: dict[str, Method] = {
    method.name: method
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name) if info.name != "base"
    for method in [importlib.import_module(f"{__name__}.{info.name}").METHOD]
}

# sweep variants: name -> settings overrides (the method's own name is a variant with no overrides)
VARIANTS: dict[str, dict] = {
    variant: {"method": method.name} | overrides
    for method in METHODS.values()
    for variant, overrides in {method.name: {}, **method.variants}.items()
}


REGISTRIES = {"methods": METHODS, "variants": VARIANTS}  # what settings' `registry` metadata names


def get_method(name: str) -> Method:
    return METHODS[check_name("methods", name, "--method")]


def check_name(registry: str, name: str, flag: str) -> str:
    """`name` if it is in the registry, else a one-line DietError listing the names there."""
    if name not in REGISTRIES[registry]:
        raise DietError(f"{flag}: unknown value {name!r}; choose one of {', '.join(REGISTRIES[registry])}")
    return name


__all__ = ["METHODS", "REGISTRIES", "VARIANTS", "Method", "check_name", "get_method"]
