"""magnitude: data-free; for each hidden dim, the share of every residual-touching matrix's squared norm
on it, summed over matrices (so the embedding does not outweigh the blocks)."""

from __future__ import annotations

import torch

from dietprune.methods.base import Context, Method
from dietprune.models.adapters import adapter_for
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


@torch.no_grad()
def magnitude_scores(model) -> torch.Tensor:
    """(d,) float64: per hidden dim, the summed share of each residual matrix's squared Frobenius norm."""
    adapter = adapter_for(model.config)
    matrices = [(model.get_input_embeddings().weight, 1)]
    if not model.config.tie_word_embeddings:
        matrices.append((model.get_output_embeddings().weight, 1))
    for layer in model.get_submodule(adapter.layers):
        matrices += [(layer.get_submodule(n).weight, 1) for n in adapter.readers]
        matrices += [(layer.get_submodule(n).weight, 0) for n in adapter.writers]
    score = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for weight, hidden_axis in matrices:
        per_dim = weight.double().square().sum(dim=1 - hidden_axis).cpu()
        score += per_dim / per_dim.sum()
    return score


def scores(context: Context, settings: PruneSettings):
    return {"magnitude": ActivationStats.fixed(magnitude_scores(context.model))}


METHOD = Method(name="magnitude", summary="data-free: each dim's share of the residual matrices' norms",
                scores=scores)
