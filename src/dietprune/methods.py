"""Which hidden dimensions to keep: DIET and the hidden-dimension baselines behind one interface.

Every method yields one score vector per source (a task, a corpus, or the method itself); `merge` turns
them into exactly K kept dims, and the same slicing (and optional recovery) path produces a
checkpoint of the same size for every method.
  diet       per-task activation scores on the tasks' calibration samples (merged by --merge)
  relative   per-task activation scores divided by the same score on generic text (what a task uses
             more than text in general), merged by --merge
  act-weight per-task activation score x the data-free magnitude score below (Wanda-style: a dim
             matters if it is both active and heavily weighted), merged by --merge
  agnostic   the same activation score on generic text: LAMBADA passages (book prose, no overlap with
             any evaluated task or the perplexity text), as many as all tasks' calibration samples
  magnitude  data-free: for each dim, the share of every residual-touching matrix's squared norm on it,
             summed over matrices (so the embedding does not outweigh the blocks)
  random     a seeded random ranking
Baselines that choose their own structure, at the same parameter count:
  shortgpt   whole decoder layers by Block Influence (structural.py)
  wanda-sp   attention heads and MLP channels by activation-weighted magnitude (structural.py)
  slicegpt   hidden dims after rotating the residual stream onto its principal axes (rotate.py;
             pre-norm architectures only)
"""

from __future__ import annotations

import torch

from dietprune.errors import DietError
from dietprune.models.adapters import adapter_for
from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages

HIDDEN_METHODS = ("diet", "relative", "act-weight", "agnostic", "magnitude", "random")
STRUCTURAL_METHODS = ("shortgpt", "wanda-sp", "slicegpt")
METHODS = HIDDEN_METHODS + STRUCTURAL_METHODS


def generic_texts(n: int) -> tuple[list[str], list[str]]:
    """(ids, texts): the first n LAMBADA test passages (see `lambada_passages`)."""
    passages = lambada_passages()
    if n > len(passages) - PERPLEXITY_PASSAGES:
        raise DietError(f"the generic corpus has {len(passages) - PERPLEXITY_PASSAGES} calibration passages, "
                        f"not {n}; ask for fewer samples")
    return [i for i, _ in passages[:n]], [t for _, t in passages[:n]]


@torch.no_grad()
def magnitude_scores(model) -> torch.Tensor:
    """(d,): per hidden dim, the summed share of each residual matrix's squared Frobenius norm."""
    adapter = adapter_for(model.config)
    matrices = [(model.get_input_embeddings().weight, 1)]
    if not model.config.tie_word_embeddings:
        matrices.append((model.get_output_embeddings().weight, 1))
    for layer in model.get_submodule(adapter.layers):
        matrices += [(layer.get_submodule(n).weight, 1) for n in adapter.readers]
        matrices += [(layer.get_submodule(n).weight, 0) for n in adapter.writers]
    score = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for weight, hidden_axis in matrices:
        per_dim = weight.double().square().sum(dim=1 - hidden_axis)
        score += per_dim / per_dim.sum()
    return score


def random_scores(hidden_size: int, seed: int) -> torch.Tensor:
    """(d,): a seeded random ranking."""
    return torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise DietError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
