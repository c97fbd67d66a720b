"""Slicing computes exactly what masking computes, for every architecture, and saves a stock checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, logits, stock_logits, tiny_model

from dietprune.errors import DietError
from dietprune.mask import masked
from dietprune.models.adapters import ADAPTERS, adapter_for
from dietprune.slice import slice_model

KEEP = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:32]


def test_every_adapter_has_a_tiny_model(model_type):
    assert adapter_for(tiny_model(model_type).config).model_types[0] == model_type
    assert set(ADAPTERS) == {"gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"}


def test_sliced_equals_masked(model_type, input_ids):
    model = tiny_model(model_type)
    with masked(model, KEEP):
        expected = logits(model, input_ids)
    sliced = slice_model(model, KEEP)
    assert sliced.config.hidden_size == len(KEEP)
    assert (logits(sliced, input_ids) - expected).abs().max() < 1e-4
    # the mask really matters: the dense model differs
    assert (logits(model, input_ids) - expected).abs().max() > 1e-2


def test_slicing_in_place_gives_the_same_model_in_the_dense_memory(model_type, input_ids, monkeypatch):
    import dietprune.slice

    monkeypatch.setattr(dietprune.slice, "CHUNK_BYTES", 100)  # many chunks, even on a tiny model
    expected = logits(slice_model(tiny_model(model_type), KEEP), input_ids)
    dense = tiny_model(model_type)
    memory = {p.data_ptr() for p in dense.parameters()}
    sliced = slice_model(dense, KEEP, in_place=True)
    assert torch.equal(logits(sliced, input_ids), expected)
    embedding = sliced.get_input_embeddings().weight
    assert embedding.data_ptr() in memory and embedding.shape[1] == len(KEEP)
    reused = [p for p in sliced.parameters() if p.data_ptr() in memory]
    assert sum(p.numel() for p in reused) > 0.9 * sum(p.numel() for p in sliced.parameters())


def test_keeping_every_dim_changes_nothing(model_type, input_ids):
    model = tiny_model(model_type)
    sliced = slice_model(model, torch.arange(HIDDEN))
    assert (logits(sliced, input_ids) - logits(model, input_ids)).abs().max() < 1e-5


def test_parameter_count_drops_on_the_hidden_axis(model_type):
    model = tiny_model(model_type)
    sliced = slice_model(model, KEEP)
    expected = sum(p.numel() * len(KEEP) // HIDDEN if HIDDEN in p.shape else p.numel()
                   for p in model.parameters())
    assert sum(p.numel() for p in sliced.parameters()) == expected


def test_width_must_fit_the_heads():
    with pytest.raises(DietError, match="multiple of the 4 attention heads"):
        slice_model(tiny_model("llama"), torch.arange(30))


def test_checkpoint_loads_in_stock_transformers(tmp_path, input_ids):
    """Every architecture's sliced checkpoint, loaded in a process that never imports dietprune."""
    expected = {}
    for model_type in sorted(ADAPTERS):
        model = tiny_model(model_type)
        with masked(model, KEEP):
            expected[model_type] = logits(model, input_ids)
        slice_model(model, KEEP).save_pretrained(tmp_path / model_type)
    loaded = stock_logits([tmp_path / name for name in expected], input_ids)
    for model_type, want in expected.items():
        assert (loaded[str(tmp_path / model_type)] - want).abs().max() < 1e-4, model_type
