"""magnitude: data-free; for each hidden dim, the share of every residual-touching matrix's squared norm
on it, summed over matrices (so the embedding does not outweigh the blocks)."""

from __future__ import annotations

import torch
from torch import nn

from dietprune.methods.base import Method, Seen
from dietprune.profile import ActivationStats
from dietprune.sequential import Observer, Stream, Weights, observe
from dietprune.settings import PruneSettings

ROWS = 1 << 15  # vocabulary rows per chunk of the embedding and the head


class Magnitude(Observer):
    """Reads each block's residual matrices as the pass brings the block in: per hidden dim, the summed
    share of each reader's and writer's squared Frobenius norm; `result` adds the embedding's and an
    untied head's, read in chunks of rows."""

    def __init__(self, weights: Weights):
        self.weights = weights
        self.score = torch.zeros(weights.model.config.hidden_size, dtype=torch.float64)

    def _add(self, per_dim: torch.Tensor) -> None:
        per_dim = per_dim.cpu()
        self.score += per_dim / per_dim.sum()

    def block(self, index: int, layer: nn.Module) -> None:
        adapter = self.weights.adapter
        for name in adapter.readers:
            self._add(layer.get_submodule(name).weight.double().square().sum(0))
        for name in adapter.writers:
            self._add(layer.get_submodule(name).weight.double().square().sum(1))

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        weights = self.weights
        matrices = [weights.embedding] + ([] if weights.model.config.tie_word_embeddings else [weights.head])
        head = torch.zeros_like(self.score)
        for name in matrices:
            per_dim = torch.zeros_like(self.score)
            for rows in weights.rows(f"{name}.weight", ROWS):
                per_dim += rows.double().square().sum(0).cpu()
            head += per_dim / per_dim.sum()
        return head + self.score


def magnitude_scores(model: nn.Module) -> torch.Tensor:
    """(d,) float64 of a model in memory (one weights-only pass)."""
    weights = Weights.of(model)
    observer = Magnitude(weights)
    observe(weights, Stream([], [], [], [], weights.device), [observer], "magnitude")
    return observer.result()


def scores(seen: Seen, settings: PruneSettings):
    return {"magnitude": ActivationStats.fixed(seen.magnitude)}


METHOD = Method(name="magnitude", summary="data-free: each dim's share of the residual matrices' norms",
                needs=frozenset({"magnitude"}), scores=scores)
