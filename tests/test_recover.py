"""Closed-form recovery: exact where exact is possible, a no-op when nothing is pruned, deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, recovered, tiny_model, tiny_tokenizer

from dietprune.recover import PARTS
from dietprune.slice import slice_model

TEXTS = ["the a is of b c d e", "Question: is the a ? Answer: yes", "a b c d e f g h i j",
         "x y z the of a", "Question: of the a b ? Answer: no", "q r s t u v w"] * 3
KEEP = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0))[:32]


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_nothing_pruned_changes_nothing(model_type, monkeypatch):
    """To the float32 forward passes' rounding with float64 products; with the default float32 ones
    (recover.PRODUCTS) to their rounding too, which these tiny ill-conditioned systems amplify to
    about 3e-5 of a weight's scale."""
    model = tiny_model(model_type)
    before = slice_model(model, torch.arange(HIDDEN)).state_dict()
    for products, tolerance in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        monkeypatch.setattr("dietprune.recover.PRODUCTS", products)
        after = recovered(model, TEXTS, torch.arange(HIDDEN), PARTS).state_dict()
        assert all((before[k] - v).abs().max() <= tolerance * before[k].abs().max() for k, v in after.items())


def test_exact_when_the_pruned_dims_are_copies_of_kept_ones():
    """Readers' refit is exact when every pruned dim of the stream is a linear function of the kept ones:
    a model whose embedding repeats its first 24 dims in the last 24 (and whose blocks write nothing)
    loses nothing once q/k/v and gate/up are refit, though the plain slice loses half of each input."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 24:] = embedding[:, :24]
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    keep = torch.arange(24)
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    repaired = recovered(model, TEXTS, keep, ("readers",), alpha=1e-9)
    with torch.no_grad():
        attention = {}
        for name, m in (("dense", model), ("repaired", repaired)):
            hook = m.model.layers[1].self_attn.q_proj.register_forward_hook(
                lambda _m, _a, out, name=name: attention.__setitem__(name, out))
            m(**batch)
            hook.remove()
    assert torch.allclose(attention["repaired"][real], attention["dense"][real], atol=1e-4)


@pytest.mark.parametrize("parts", [("readers",), PARTS])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama", "qwen3"])
def test_recovery_moves_the_pruned_model_towards_the_dense_one(model_type, parts):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**batch).logits[real]
        plain_error = (slice_model(model, KEEP)(**batch).logits[real] - dense).pow(2).mean()
        sliced = recovered(model, TEXTS, KEEP, parts)
        repaired_error = (sliced(**batch).logits[real] - dense).pow(2).mean()
    assert repaired_error < 0.7 * plain_error
    assert sliced.config.hidden_size == len(KEEP)  # same shapes as the plain sliced model


def test_deterministic():
    model = tiny_model("llama")
    runs = [recovered(model, TEXTS, KEEP, PARTS).state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_in_place_recovery_lives_in_the_dense_memory_and_gives_the_same_model(model_type):
    """Sliced and refit block by block, each block then moved into the dense block's memory: the result
    of the copying run, and every weight of the pruned model inside the dense model's tensors."""
    copied = recovered(tiny_model(model_type), TEXTS, KEEP, PARTS).state_dict()
    dense = tiny_model(model_type)
    memory = {p.data_ptr() for p in dense.parameters()}
    pruned = recovered(dense, TEXTS, KEEP, PARTS, in_place=True)
    in_place = pruned.state_dict()
    assert copied.keys() == in_place.keys()
    assert all(torch.equal(copied[k], in_place[k]) for k in copied)
    matrices = [p for p in pruned.model.layers.parameters() if p.dim() == 2]
    assert matrices and all(p.data_ptr() in memory for p in matrices)


def test_the_blocked_cholesky_solves_in_place_what_lapack_solves():
    """The writer's m x m system is factorised over itself, a block at a time (no second m x m matrix):
    the same factor and solution as LAPACK's; a singular system is one line."""
    from dietprune.errors import DietError
    from dietprune.recover import _cholesky, _solve

    torch.manual_seed(0)
    x = torch.randn(300, 200, dtype=torch.float64)
    system = x.T @ x + 0.1 * torch.eye(200, dtype=torch.float64)
    rhs = torch.randn(200, 7, dtype=torch.float64)
    memory = system.clone()
    factor = _cholesky(memory, block=64)
    assert factor.data_ptr() == memory.data_ptr()
    assert torch.allclose(factor.tril(), torch.linalg.cholesky(system), atol=1e-10)
    assert torch.allclose(_solve(factor, rhs), torch.linalg.solve(system, rhs), atol=1e-9)
    with pytest.raises(DietError, match="singular"):
        _cholesky(torch.zeros(70, 70, dtype=torch.float64), block=64)


def test_generic_text_joins_the_recovery_set(isolated_cache):
    """--recover-generic N adds the first N LAMBADA passages (never evaluated: perplexity reads the last
    256) to the texts the refit matches, and records them as used; auto (the default) adds as many as
    the recovery set's task samples, 0 none."""
    import dietprune

    options = dict(sparsity=0.25, samples=4, tasks=("rte", "boolq"), recover_samples=2)
    plain = dietprune.prune(tiny_model("llama"), tiny_tokenizer(), recover_generic=0, **options)
    mixed = dietprune.prune(tiny_model("llama"), tiny_tokenizer(), recover_generic=3, **options)
    auto = dietprune.prune(tiny_model("llama"), tiny_tokenizer(), **options)
    assert mixed.record["recovery"]["tasks"]["lambada"]["ids"] == ["0", "1", "2"]
    assert mixed.record["calibration"]["lambada"]["ids"] == ["0", "1", "2"]
    assert auto.record["recovery"]["tasks"]["lambada"]["ids"] == ["0", "1", "2", "3"]  # 2 tasks x 2
    assert "lambada" not in plain.record["recovery"]["tasks"]
    assert plain.record["kept_dims"] == mixed.record["kept_dims"]
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(plain.model.state_dict()[weight], mixed.model.state_dict()[weight])
