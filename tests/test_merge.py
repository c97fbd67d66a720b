"""Merging per-task scores into one mask: exact K, known answers, documented tie-breaks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dietprune.errors import DietError
from dietprune.merge import kept_width, kept_width_step, merge, task_votes


def test_vote_keeps_majority_not_largest_mean():
    # dim 0 is huge for one task only; dims 1-2 are moderately high in all three tasks
    scores = torch.tensor([[100.0, 2.0, 2.0, 1.0],
                           [0.1, 2.0, 2.0, 1.0],
                           [0.1, 2.0, 2.0, 1.0]])
    assert merge(scores, 2, "vote").tolist() == [1, 2]
    assert merge(scores, 2, "mean").tolist() == [0, 1]  # the ablation differs, as it should


def test_weighted_vote_counts_strong_dims_more():
    # dim 2 is one task's strongest dim by far; dim 3 is a weak pick of two tasks
    scores = torch.tensor([[1.0, 1.0, 8.0, 0.5], [1.0, 1.0, 0.5, 0.6], [1.0, 1.0, 0.5, 0.6]])
    assert task_votes(scores, 3).sum(0).tolist() == [3, 3, 1, 2]
    assert merge(scores, 3, "vote").tolist() == [0, 1, 3]  # two votes beat one
    assert merge(scores, 3, "weighted").tolist() == [0, 1, 2]  # one strong vote beats two weak ones
    assert merge(torch.ones(2, 5), 3, "weighted").tolist() == [0, 1, 2]  # exact ties -> lower index


def test_vote_ties_broken_by_mean_normalised_score_then_index():
    # top-1 votes: task A -> dim 0, task B -> dim 1; one vote each. Normalised means decide.
    scores = torch.tensor([[4.0, 1.0, 1.0],
                           [1.0, 5.0, 1.0]])
    assert merge(scores, 1, "vote").tolist() == [1]
    # exact tie everywhere -> lower index wins
    assert merge(torch.ones(2, 5), 3, "vote").tolist() == [0, 1, 2]


def test_per_task_ranking_ties_go_to_lower_index():
    votes = task_votes(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2)
    assert votes.tolist() == [[True, True, False, False]]


def test_exact_k_and_deterministic():
    scores = torch.rand(7, 640, generator=torch.Generator().manual_seed(0))
    first = merge(scores, 512)
    assert len(first) == 512 and len(first.unique()) == 512
    assert torch.equal(first, merge(scores.clone(), 512))
    assert torch.equal(first, first.sort().values)


def test_mean_normalisation_is_scale_free():
    scores = torch.rand(3, 50, generator=torch.Generator().manual_seed(1))
    scaled = scores * torch.tensor([[1.0], [1000.0], [0.001]])
    assert torch.equal(merge(scores, 20, "mean"), merge(scaled, 20, "mean"))


@pytest.mark.parametrize("sparsity, step, k", [(0.2, 8, 512), (0.2, 1, 512), (0.1, 8, 576),
                                               (0.5, 64, 320), (0.3, 8, 448)])
def test_kept_width(sparsity, step, k):
    assert kept_width(640, sparsity, step) == k


@pytest.mark.parametrize("width, heads, round_to, step", [
    (640, 4, None, 8),  # Gemma-3 270M: 20% -> K = 512
    (576, 9, None, 9),  # SmolLM2: lcm(8, 9) = 72 would turn 20% into 25%
    (2304, 8, None, 32),  # Gemma-2 2B
    (4096, 32, None, 64),  # Llama-2 7B
    (896, 14, None, 14),  # Qwen2.5 0.5B
    (576, 9, 8, 72),  # an explicit rounding is kept, whatever the step
])
def test_kept_width_step(width, heads, round_to, step):
    config = SimpleNamespace(hidden_size=width, num_attention_heads=heads)
    assert kept_width_step(config, round_to) == step


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval(sparsity):
    with pytest.raises(DietError, match="strictly between 0 and 1"):
        kept_width(640, sparsity, 8)


def test_rounding_that_leaves_nothing():
    with pytest.raises(DietError, match="after rounding"):
        kept_width(64, 0.95, 64)


def test_bad_scores():
    with pytest.raises(DietError, match="NaN"):
        merge(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(DietError, match="unknown merge"):
        merge(torch.ones(1, 4), 2, "median")
