"""Merging per-task scores into one mask: exact K, known answers, documented tie-breaks; the rule for K."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import CONFIGS, tiny_config

from dietprune.errors import DietError
from dietprune.merge import TOLERANCE, kept_width, kept_width_record, kept_width_step, merge, task_votes


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
                                               (0.5, 64, 320), (0.3, 8, 448), (0.999, 4, 4)])
def test_kept_width(sparsity, step, k):
    assert kept_width(640, sparsity, step) == k  # strictly between 0 and the width: 0.999 keeps one step


def config(width: int, heads: int) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=width, num_attention_heads=heads)


@pytest.mark.parametrize("width, heads, sparsity, round_to, step", [
    (640, 4, 0.2, None, 256),  # Gemma-3 270M: K = 512, as before
    (640, 4, 0.1, None, 64),  # 576: 512 (20%) is the nearest multiple of 256 and 128
    (576, 9, 0.2, None, 9),  # SmolLM2: lcm(8, 9) = 72 gives 432 or 504, 5 points off: the heads, 459
    (576, 9, 0.1, None, 72),  # 504, exactly 2.5 points off
    (2304, 8, 0.2, None, 256),  # Gemma-2 2B: 1792, 2.2 points off
    (2304, 8, 0.3, None, 128),  # 1536 and 1792 are 3.3 and 7.8 points off; 1664 is 2.2
    (896, 14, 0.2, None, 56),  # Qwen2.5 0.5B: 728
    (48, 4, 0.2, None, 4),  # too narrow for any alignment within 2.5 points (40 is 3.3 off): the heads
    (640, 4, 0.22, 64, 64),  # an explicit rounding within 2.5 points is kept (512, 2 points off)
    (640, 4, 0.1, 1, 4),  # 576
])
def test_kept_width_step(width, heads, sparsity, round_to, step):
    assert kept_width_step(config(width, heads), sparsity, round_to) == step


@pytest.mark.parametrize("name, width, heads, k", [("Gemma2Config", 2304, 8, 1792),  # Gemma-2 2B
                                                     ("LlamaConfig", 4096, 32, 3328),  # Llama-3 8B
                                                     ("MistralConfig", 4096, 32, 3328)])  # Mistral 7B
def test_default_width_at_20_percent_quantises(name, width, heads, k):
    """Released shapes at 20%: K a multiple of 256 (llama.cpp's k-quants, vLLM's Marlin), 2.5 points at most
    from the asked sparsity."""
    record = kept_width_record(getattr(transformers, name)(hidden_size=width, num_attention_heads=heads), 0.2,
                               None)
    assert record["kept"] == k and k % 256 == 0 and abs(record["sparsity"] - 0.2) <= TOLERANCE
    assert all(record["serving"].values()) and record["why"] is None


def test_unaligned_width_says_why():
    record = kept_width_record(config(576, 9), 0.2, None)  # SmolLM2: no multiple of lcm(256, 9) below 576
    assert record["kept"] == 459 and record["multiple_of"] == 9 and record["sparsity"] == 0.2031
    assert record["serving"] == {"llama.cpp k-quants": False, "vLLM Marlin": False,
                                 "llama.cpp Q8_0/Q5_0/Q4_0": False, "vLLM RMSNorm vectorised": False}
    assert record["lost"] == ["llama.cpp Q8_0/Q5_0/Q4_0", "vLLM RMSNorm vectorised"]  # 576: never 256-aligned
    assert record["why"].endswith("; the dense 576 is a multiple of 32 and 8; with 9 heads, 32-aligned "
                                  "widths are multiples of 288: sparsities 0.5 (K 288), more than 2.5 points "
                                  "from 0.2")
    record = kept_width_record(config(2304, 8), 0.3, None)  # Marlin's 128 met, not 256
    assert record["serving"] == {"llama.cpp k-quants": False, "vLLM Marlin": True,
                                 "llama.cpp Q8_0/Q5_0/Q4_0": True, "vLLM RMSNorm vectorised": True}
    assert record["lost"] == ["llama.cpp k-quants"]
    assert record["why"].startswith("K 1664 (sparsity 0.2778) is not a multiple of 256 (llama.cpp k-quants); "
                                    "the dense 2304 is a multiple of 256; with 8 heads")
    assert "0.3333 (K 1536) and 0.2222 (K 1792), more than 2.5 points from 0.3" in record["why"]
    record = kept_width_record(config(640, 4), 0.1, 1)
    assert record["why"].endswith("--round-to 1 with 4 heads asks for multiples of 4")


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_adapters_tiny_model_says_why(model_type):
    """48 wide with 4 heads: no multiple of 256 exists, and the record says so; K 40 at 20% loses no alignment
    the dense 48 had (nothing to warn about), K 36 at 25% loses its multiple of 8."""
    record = kept_width_record(tiny_config(model_type), 0.2, None)
    assert record["kept"] == 40 and not record["serving"]["llama.cpp k-quants"] and record["lost"] == []
    assert record["why"].endswith("256-aligned widths are multiples of 256: none is below 48")
    record = kept_width_record(tiny_config(model_type), 0.25, None)
    assert record["kept"] == 36 and record["lost"] == ["vLLM RMSNorm vectorised"]
    assert record["why"].endswith("the dense 48 is a multiple of 8; with 4 heads, 8-aligned widths are "
                                  "multiples of 8: sparsities 0.3333 (K 32) and 0.1667 (K 40), more than 2.5 "
                                  "points from 0.25")


@pytest.mark.parametrize("width, heads, sparsity, round_to, message", [
    (576, 9, 0.2, 256, "multiple of 2304, so the nearest possible sparsities are none (no multiple is "
                       "below 576); --round-to 32 allows 0.5 (K 288); --round-to auto keeps K 459 (sparsity "
                       "0.2031)"),
    (640, 4, 0.3, 128, "multiple of 128, so the nearest possible sparsities are 0.4 (K 384) and 0.2 (K 512), "
                       "more than 2.5 points away; --round-to auto keeps K 448 (sparsity 0.3)"),
])
def test_alignment_the_model_cannot_take(width, heads, sparsity, round_to, message):
    with pytest.raises(DietError, match=re.escape(message)):
        kept_width_step(config(width, heads), sparsity, round_to)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval(sparsity):
    with pytest.raises(DietError, match="strictly between 0 and 1"):
        kept_width(640, sparsity, 8)
    with pytest.raises(DietError, match="strictly between 0 and 1"):
        kept_width_step(config(640, 4), sparsity, None)


def test_rounding_that_leaves_nothing():
    with pytest.raises(DietError, match="after rounding"):
        kept_width(64, 0.95, 64)


def test_bad_scores():
    with pytest.raises(DietError, match="NaN"):
        merge(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(DietError, match="unknown merge"):
        merge(torch.ones(1, 4), 2, "median")
