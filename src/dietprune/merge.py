"""Merge: per-task importance scores -> one global mask of exactly K kept hidden dimensions.

vote (DIET): each task votes for its top-K dimensions (ties in a task's ranking go to the lower index);
    the K dimensions with the most votes are kept. Tie-break among equal vote counts: the higher mean
    normalised score (each task's scores divided by their mean, so no task dominates by scale), then
    the lower index.
weighted: as vote, but each task's vote for a dimension weighs that task's normalised score of it (a
    task's strong dimensions count more than its marginal ones); same tie-break.
mean: the K dimensions with the highest mean normalised score (the ablation of voting).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dietprune.errors import DietError
from dietprune.settings import MERGES

AUTO_ROUNDINGS = (64, 32, 16, 8, 4, 2, 1)


def kept_width_step(config, round_to: int | None) -> int:
    """Kept widths must be multiples of this: lcm(round_to, attention heads); transformers rejects a width
    the head count does not divide. `round_to=None` (auto): the largest of `AUTO_ROUNDINGS` whose step
    is at most hidden_size / 64, so that rounding moves the sparsity by at most ~0.8 points (Gemma-3
    270M: 8; SmolLM2's 9 heads: 1, steps of 9; widths of 4096 with 32 heads: 64)."""
    heads = config.num_attention_heads
    if round_to is None:
        round_to = next(r for r in AUTO_ROUNDINGS if math.lcm(r, heads) <= config.hidden_size / 64 or r == 1)
    return math.lcm(round_to, heads)


def kept_width(hidden_size: int, sparsity: float, step: int) -> int:
    """K = hidden_size * (1 - sparsity), rounded to the nearest multiple of `step`."""
    if not 0 < sparsity < 1:
        raise DietError(f"sparsity must be strictly between 0 and 1, got {sparsity}")
    k = step * round(hidden_size * (1 - sparsity) / step)
    if not 0 < k < hidden_size:
        raise DietError(f"sparsity {sparsity} leaves {k} of {hidden_size} dims after rounding to "
                        f"multiples of {step}; choose another sparsity or --round-to")
    return k


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Each task's scores divided by their mean: (tasks, d) float64."""
    scores = scores.double()
    return scores / scores.mean(dim=1, keepdim=True)


def task_votes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(tasks, d) bool: True where the dimension is in that task's top-k (ties -> lower index)."""
    order = torch.argsort(-scores.double(), dim=1, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def merge(scores: torch.Tensor, k: int, method: str = "vote") -> torch.Tensor:
    """Indices (sorted, int64) of the k hidden dimensions to keep, from (tasks, d) scores."""
    if scores.ndim != 2 or not 0 < k <= scores.shape[1]:
        raise DietError(f"cannot keep {k} dims from scores of shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise DietError("scores contain NaN or infinite values; re-run `diet profile`")
    mean_score = normalised(scores).mean(dim=0).numpy()
    index = np.arange(scores.shape[1])
    if method in ("vote", "weighted"):
        votes = task_votes(scores, k).double()
        if method == "weighted":
            votes *= normalised(scores)
        order = np.lexsort((index, -mean_score, -votes.sum(dim=0).numpy()))  # last key is primary
    elif method == "mean":
        order = np.lexsort((index, -mean_score))
    else:
        raise DietError(f"unknown merge {method!r}; choose one of {', '.join(MERGES)}")
    return torch.from_numpy(np.sort(order[:k]))


def agreement(scores: torch.Tensor, keep: torch.Tensor, names: list[str]) -> dict[str, int]:
    """For each task, how many of its own top-K dims the global mask keeps."""
    votes = task_votes(scores, len(keep))
    return {name: int(votes[i, keep].sum()) for i, name in enumerate(names)}
