"""Mask simulation: zero the pruned hidden dimensions with forward hooks, without changing any weight.

The residual stream is the embedding output plus every writer's output, so zeroing the pruned
dimensions of exactly those outputs keeps them zero everywhere. Slicing must compute the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from dietprune.models.adapters import adapter_for


def residual_writers(model: nn.Module) -> list[nn.Module]:
    """The embedding and every module whose output is added to the residual stream."""
    adapter = adapter_for(model.config)
    layers = model.get_submodule(adapter.layers)
    return [model.get_input_embeddings()] + [
        layer.get_submodule(name) for layer in layers for name in adapter.writers
    ]


@contextlib.contextmanager
def masked(model: nn.Module, keep: torch.Tensor) -> Iterator[nn.Module]:
    """Within the context, `model` behaves as if only the hidden dimensions `keep` existed."""
    mask = torch.zeros(model.config.hidden_size, dtype=torch.bool)
    mask[keep] = True

    def zero_pruned(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * mask.to(device=output.device, dtype=output.dtype)

    handles = [module.register_forward_hook(zero_pruned) for module in residual_writers(model)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
