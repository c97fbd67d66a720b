"""Merge: per-task importance scores -> one global mask of exactly K kept hidden dimensions.

vote (DIET): each task votes for its top-K dimensions (ties in a task's ranking go to the lower index);
    the K dimensions with the most votes are kept. Tie-break among equal vote counts: the higher mean
    normalised score (each task's scores divided by their mean, so no task dominates by scale), then
    the lower index.
weighted: as vote, but each task's vote for a dimension weighs that task's normalised score of it (a
    task's strong dimensions count more than its marginal ones); same tie-break.
mean: the K dimensions with the highest mean normalised score (the ablation of voting).

K itself is chosen for where the checkpoint will be served (kept_width_step, docs/SERVING.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dietprune.errors import DietError
from dietprune.settings import MERGES

TOLERANCE = 0.025  # rounding K to an alignment moves the sparsity by at most 2.5 points
ALIGNMENTS = (256, 128, 64, 32, 16, 8)  # what `--round-to auto` tries, largest first
# The row widths each serving path needs (docs/SERVING.md); each divides the one before, so a K that
# meets the first meets them all.
SERVING = {"llama.cpp k-quants": 256, "vLLM Marlin": 128, "llama.cpp Q8_0/Q5_0/Q4_0": 32,
           "vLLM RMSNorm vectorised": 8}


def kept_width_step(config, sparsity: float, round_to: int | None) -> int:
    """Kept widths are multiples of lcm(alignment, attention heads): transformers rejects a width the head
    count does not divide. K is the row width of the q/k/v/gate/up weights, the embeddings and the head,
    and llama-quantize gives a row of k-quants (Q4_K_M's types) only if it is a multiple of 256, else it
    falls back per tensor, to Q5_0 or, not a multiple of 32 either, to F16 (3.5x the bytes of Q4_K per
    weight, more than pruning saves). vLLM's Marlin kernels (GPTQ/AWQ) take inputs that are multiples of
    128 and outputs of 64, and its RMSNorm vectorises widths that are multiples of 8. `round_to=None`
    (auto): the largest of ALIGNMENTS whose nearest multiple lies within TOLERANCE of the asked sparsity
    (Gemma-3 270M at 20%: 256, K = 512; Llama-3 8B: 256, K = 3328); below 8 no kernel cares, so where none
    fits, the head count alone (SmolLM2's 9 heads at 20%: K = 459). An explicit `round_to` is refused when
    its nearest multiple lies further away."""
    d, heads = config.hidden_size, config.num_attention_heads
    check_sparsity(sparsity)
    target = d * (1 - sparsity)
    for alignment in ALIGNMENTS if round_to is None else (round_to,):
        step = math.lcm(alignment, heads)
        k = nearest_multiple(d, target, step)
        if k is not None and abs(k - target) <= TOLERANCE * d + 1e-9:
            return step
    if round_to is None:
        return heads
    auto = kept_width(d, sparsity, kept_width_step(config, sparsity, None))
    nearest = neighbours(d, sparsity, step)
    if not nearest:  # name the largest smaller alignment that has widths at all
        fits = next((a for a in ALIGNMENTS if a < round_to and math.lcm(a, heads) < d), None)
        nearest = f"none (no multiple is below {d})" + (
            f"; --round-to {fits} allows {neighbours(d, sparsity, math.lcm(fits, heads))}" if fits else "")
    else:
        nearest += f", more than {100 * TOLERANCE:g} points away"
    raise DietError(f"--round-to {round_to} at sparsity {sparsity} of a {d}-wide model with {heads} heads: "
                    f"K must be a multiple of {step}, so the nearest possible sparsities are {nearest}; "
                    f"--round-to auto keeps K {auto} (sparsity {1 - auto / d:.4g})")


def kept_width(hidden_size: int, sparsity: float, step: int) -> int:
    """K = hidden_size * (1 - sparsity), rounded to the nearest multiple of `step` strictly between 0 and
    hidden_size."""
    check_sparsity(sparsity)
    k = nearest_multiple(hidden_size, hidden_size * (1 - sparsity), step)
    if k is None:
        raise DietError(f"sparsity {sparsity} leaves no width after rounding to multiples of {step}: none "
                        f"lies between 0 and {hidden_size}; choose another --round-to")
    return k


def kept_width_record(config, sparsity: float, round_to: int | None) -> dict:
    """dietprune.json's "width": K, the step it is a multiple of, whether it meets each serving path's
    alignment, why not where it does not (None when it meets them all), and `lost`: the alignments the
    dense width met and K does not (what pruning costs at serving time; dietprune warns only about these,
    so a 48-wide toy model, never 256-aligned, is not warned about 256)."""
    d, heads = config.hidden_size, config.num_attention_heads
    step = kept_width_step(config, sparsity, round_to)
    k = kept_width(d, sparsity, step)
    serving = {name: k % n == 0 for name, n in SERVING.items()}
    lost = [name for name, n in SERVING.items() if k % n and not d % n]
    why = None
    if not all(serving.values()):
        unmet = ", ".join(f"{n} ({name})" for name, n in SERVING.items() if k % n)
        met = " and ".join(str(SERVING[name]) for name in lost)
        dense = f"; the dense {d} is a multiple of {met}" if lost else ""
        wanted = SERVING[lost[0]] if lost else max(SERVING.values())
        aligned = math.lcm(wanted, heads)
        if round_to is not None:
            reason = f"--round-to {round_to} with {heads} heads asks for multiples of {step}"
        else:
            nearest = neighbours(d, sparsity, aligned)
            reason = (f"with {heads} heads, {wanted}-aligned widths are multiples of {aligned}: "
                      + (f"sparsities {nearest}, more than {100 * TOLERANCE:g} points from {sparsity}"
                         if nearest else f"none is below {d}"))
        why = f"K {k} (sparsity {1 - k / d:.4g}) is not a multiple of {unmet}{dense}; {reason}"
    return {"kept": k, "sparsity": round(1 - k / d, 4), "multiple_of": step, "serving": serving, "lost": lost,
            "why": why}


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise DietError(f"sparsity must be strictly between 0 and 1, got {sparsity}")


def nearest_multiple(width: int, target: float, step: int) -> int | None:
    """The multiple of `step` strictly between 0 and `width` nearest to `target` (None if there is none)."""
    top = (width - 1) // step * step
    return min(max(step * round(target / step), step), top) if top else None


def neighbours(width: int, sparsity: float, step: int) -> str:
    """The sparsities of the multiples of `step` on either side of the asked one, e.g. "0.2 (K 512) and 0.4
    (K 384)"; empty when no multiple lies between 0 and `width`."""
    target = width * (1 - sparsity) / step
    widths = dict.fromkeys(k for k in (step * math.floor(target), step * math.ceil(target)) if 0 < k < width)
    return " and ".join(f"{1 - k / width:.4g} (K {k})" for k in widths)


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
