"""random: a seeded random ranking of the hidden dims (--random-seed; not the calibration seed)."""

from __future__ import annotations

import torch

from dietprune.methods.base import Method, Seen
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


def random_scores(hidden_size: int, seed: int) -> torch.Tensor:
    """(d,): a seeded random ranking."""
    return torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def scores(seen: Seen, settings: PruneSettings):
    return {"random": ActivationStats.fixed(random_scores(seen.width, settings.random_seed))}


METHOD = Method(name="random", summary="a seeded random ranking", scores=scores,
                variants={f"random-{seed}": {"random_seed": seed} for seed in (0, 1, 2)})
