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

import numpy as np
import torch

from dietprune.errors import DietError

MERGES = ("vote", "weighted", "mean")


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
