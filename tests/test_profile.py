"""Profiling: DIET's score from hooks equals a direct computation; padding never counts."""

from __future__ import annotations

import pytest
import torch
from conftest import profile_texts, tiny_model, tiny_tokenizer

from dietprune.errors import DietError

TEXTS = ["the a is of", "Question: is the a ? Answer: yes", "a", "b c d e f g h i j k l m n"]


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_block_output_score_matches_hidden_states(model_type):
    model = tiny_model(model_type)
    model.model.norm = torch.nn.Identity()  # so hidden_states[1:] are exactly the block outputs
    tok = tiny_tokenizer()
    stats = profile_texts(model, TEXTS, rows=3)
    total, tokens = torch.zeros(model.config.hidden_size, dtype=torch.float64), 0
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[1:]
        total += torch.stack(hidden).abs().mean(0).sum((0, 1)).double()
        tokens += ids.shape[1]
    assert stats.tokens == tokens
    assert torch.allclose(stats.score("l1"), total / tokens, rtol=1e-5)


def test_padding_and_batching_do_not_change_scores():
    model = tiny_model("gemma3_text")
    one = profile_texts(model, TEXTS, rows=1)
    many = profile_texts(model, TEXTS, rows=4)
    assert one.tokens == many.tokens
    assert torch.allclose(one.sum_abs, many.sum_abs, rtol=1e-5)
    assert torch.allclose(one.sum_sq, many.sum_sq, rtol=1e-5)


def test_sums_add_across_shards():
    model = tiny_model("llama")
    whole = profile_texts(model, TEXTS)
    parts = profile_texts(model, TEXTS[:2]) + profile_texts(model, TEXTS[2:])
    assert torch.allclose(whole.sum_abs, parts.sum_abs, rtol=1e-6) and whole.tokens == parts.tokens


def test_norm_output_site_differs_and_unknown_site_fails():
    model = tiny_model("gemma3_text")
    block = profile_texts(model, TEXTS).score()
    norm = profile_texts(model, TEXTS, site="norm_output").score()
    assert not torch.allclose(block, norm)
    with pytest.raises(DietError, match="unknown activation site"):
        profile_texts(model, TEXTS, site="attention")
    with pytest.raises(DietError, match="unknown aggregation"):
        profile_texts(model, TEXTS).score("l3")
