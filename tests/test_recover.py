"""Closed-form recovery: exact where exact is possible, a no-op when nothing is pruned, deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, tiny_model, tiny_tokenizer
from torch import nn

from dietprune.recover import PARTS, _refit_readers, recover
from dietprune.slice import slice_model

TEXTS = ["the a is of b c d e", "Question: is the a ? Answer: yes", "a b c d e f g h i j",
         "x y z the of a", "Question: of the a b ? Answer: no", "q r s t u v w"] * 3
KEEP = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0))[:32]


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_nothing_pruned_changes_nothing(model_type):
    model = tiny_model(model_type)
    before = slice_model(model, torch.arange(HIDDEN)).state_dict()
    sliced = recover(model, tiny_tokenizer(), TEXTS, torch.arange(HIDDEN), parts=PARTS)
    assert all(torch.allclose(before[k], v, rtol=1e-4, atol=1e-5) for k, v in sliced.state_dict().items())


def test_exact_when_dense_inputs_are_a_linear_function_of_kept_ones():
    torch.manual_seed(0)
    n_kept = torch.randn(500, 8, dtype=torch.float64)
    mixing = torch.randn(8, 12, dtype=torch.float64)
    n_dense = n_kept @ mixing  # the 12 dense dims live in the span of the 8 kept ones
    dense, pruned = nn.ModuleDict({"q": nn.Linear(12, 5, bias=False)}), nn.ModuleDict(
        {"q": nn.Linear(8, 5, bias=False)})
    dense.double()
    pruned.double()
    _refit_readers(dense, pruned, ["q"], n_dense, n_kept, alpha=1e-12)
    assert torch.allclose(pruned["q"](n_kept), dense["q"](n_dense), atol=1e-6)


@pytest.mark.parametrize("parts", [("readers",), PARTS])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama", "qwen3"])
def test_recovery_moves_the_pruned_model_towards_the_dense_one(model_type, parts):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**batch).logits[real]
        plain_error = (slice_model(model, KEEP)(**batch).logits[real] - dense).pow(2).mean()
        sliced = recover(model, tok, TEXTS, KEEP, parts=parts)
        repaired_error = (sliced(**batch).logits[real] - dense).pow(2).mean()
    assert repaired_error < 0.7 * plain_error
    assert sliced.config.hidden_size == len(KEEP)  # same shapes as the plain sliced model


def test_deterministic():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    runs = [recover(model, tok, TEXTS, KEEP, parts=PARTS).state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_in_place_recovery_lives_in_the_dense_memory_and_gives_the_same_model(model_type):
    """Sliced and refit block by block, each block then moved into the dense block's memory: the result
    of the copying run, and every weight of the pruned model inside the dense model's tensors."""
    tok = tiny_tokenizer()
    copied = recover(tiny_model(model_type), tok, TEXTS, KEEP, parts=PARTS).state_dict()
    dense = tiny_model(model_type)
    memory = {p.data_ptr() for p in dense.parameters()}
    pruned = recover(dense, tok, TEXTS, KEEP, parts=PARTS, in_place=True)
    in_place = pruned.state_dict()
    assert copied.keys() == in_place.keys()
    assert all(torch.equal(copied[k], in_place[k]) for k in copied)
    matrices = [p for p in pruned.model.layers.parameters() if p.dim() == 2]
    assert matrices and all(p.data_ptr() in memory for p in matrices)
