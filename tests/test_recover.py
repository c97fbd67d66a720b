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


@pytest.mark.parametrize("head", ["gains", "linear"])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_nothing_pruned_changes_nothing(model_type, head, monkeypatch):
    """To the float32 forward passes' rounding with float64 products; with the default float32 ones
    (lstsq.PRODUCTS) to their rounding too, which these tiny ill-conditioned systems amplify to
    about 3e-5 of a weight's scale. The linear head's map is then the identity (a tied one's too)."""
    model = tiny_model(model_type)
    before = slice_model(model, torch.arange(HIDDEN)).state_dict()
    for products, tolerance in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        monkeypatch.setattr("dietprune.lstsq.PRODUCTS", products)
        after = recovered(model, TEXTS, torch.arange(HIDDEN), PARTS, head=head).state_dict()
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


def _logits_error(model, pruned) -> float:
    """Mean squared difference of the pruned model's logits from the dense model's on calibration text."""
    batch = tiny_tokenizer()(TEXTS[:4], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        return float((pruned(**batch).logits[real] - model(**batch).logits[real]).pow(2).mean())


@pytest.mark.parametrize(("parts", "head"), [(("readers",), "gains"), (PARTS, "gains"), (PARTS, "linear")])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama", "qwen3"])
def test_recovery_moves_the_pruned_model_towards_the_dense_one(model_type, parts, head):
    model = tiny_model(model_type)
    sliced = recovered(model, TEXTS, KEEP, parts, head=head)
    assert _logits_error(model, sliced) < 0.7 * _logits_error(model, slice_model(model, KEEP))
    assert sliced.config.hidden_size == len(KEEP)  # same shapes as the plain sliced model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_an_untied_linear_head_fits_the_logits_better_than_the_gains(model_type):
    """Fitted last on the pruned model's own final states, the linear map is the least-squares fit of the
    logits over a family that holds every rescaling of the kept columns (the gains' family): with
    little damping its logits are nearer the dense ones on the texts it was fitted on (here, on random
    weights, by more than 10x; a map fitted to the wrong states or applied to the wrong matrix is not)."""
    model = tiny_model(model_type)
    errors = {head: _logits_error(model, recovered(model, TEXTS, KEEP, PARTS, alpha=1e-4, head=head))
              for head in ("gains", "linear")}
    assert errors["linear"] < 0.1 * errors["gains"]


def test_deterministic():
    model = tiny_model("llama")
    runs = [recovered(model, TEXTS, KEEP, PARTS).state_dict() for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("head", ["gains", "linear"])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_in_place_recovery_lives_in_the_dense_memory_and_gives_the_same_model(model_type, head):
    """Sliced and refit block by block, each block then moved into the dense block's memory: the result
    of the copying run, and every weight of the pruned model inside the dense model's tensors (the
    linear head's map too: it is written over the matrix it reads, a chunk of rows at a time)."""
    copied = recovered(tiny_model(model_type), TEXTS, KEEP, PARTS, head=head).state_dict()
    dense = tiny_model(model_type)
    memory = {p.data_ptr() for p in dense.parameters()}
    pruned = recovered(dense, TEXTS, KEEP, PARTS, in_place=True, head=head)
    in_place = pruned.state_dict()
    assert copied.keys() == in_place.keys()
    assert all(torch.equal(copied[k], in_place[k]) for k in copied)
    matrices = [p for p in pruned.model.layers.parameters() if p.dim() == 2]
    assert matrices and all(p.data_ptr() in memory for p in matrices)
    assert pruned.get_input_embeddings().weight.data_ptr() in memory


def test_the_blocked_cholesky_solves_in_place_what_lapack_solves():
    """The writer's m x m system is factorised over itself, a block at a time (no second m x m matrix):
    the same factor and solution as LAPACK's; a singular system is one line."""
    from dietprune.errors import DietError
    from dietprune.lstsq import cholesky, solve

    torch.manual_seed(0)
    x = torch.randn(300, 200, dtype=torch.float64)
    system = x.T @ x + 0.1 * torch.eye(200, dtype=torch.float64)
    rhs = torch.randn(200, 7, dtype=torch.float64)
    memory = system.clone()
    factor = cholesky(memory, block=64)
    assert factor.data_ptr() == memory.data_ptr()
    assert torch.allclose(factor.tril(), torch.linalg.cholesky(system), atol=1e-10)
    assert torch.allclose(solve(factor, rhs), torch.linalg.solve(system, rhs), atol=1e-9)
    with pytest.raises(DietError, match="singular"):
        cholesky(torch.zeros(70, 70, dtype=torch.float64), block=64)


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


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_mlp_channels_that_copy_kept_ones_are_cut_without_loss(model_type):
    """--mlp-sparsity: in a model whose MLP channels 40-79 repeat channels 0-39 (gate/up rows equal),
    greedy OBS cuts one of each pair and down_proj's refit adds the twin's column to the one kept: the
    40-channel model computes the dense logits; once the copies are broken, it cannot."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    with torch.no_grad():
        for layer in model.model.layers:
            for reader in (layer.mlp.gate_proj, layer.mlp.up_proj):
                reader.weight[40:] = reader.weight[:40]
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    pruned = recovered(model, TEXTS, torch.arange(HIDDEN), PARTS, alpha=1e-6, channels=40)
    assert pruned.config.intermediate_size == 40
    assert all(layer.mlp.down_proj.weight.shape == (HIDDEN, 40) for layer in pruned.model.layers)
    for layer in pruned.model.layers:  # one channel of each pair stays
        rows = layer.mlp.gate_proj.weight
        assert len({tuple(r) for r in rows.tolist()}) == 40
    with torch.no_grad():
        dense = model(**batch).logits[real]
        assert torch.allclose(pruned(**batch).logits[real], dense, atol=2e-4 * dense.abs().max())
        for layer in model.model.layers:  # break the copies: now 40 channels cannot carry 80
            layer.mlp.gate_proj.weight[40:].normal_(0, 0.3)
        broken = recovered(model, TEXTS, torch.arange(HIDDEN), PARTS, alpha=1e-6, channels=40)
        assert not torch.allclose(broken(**batch).logits[real], model(**batch).logits[real], atol=1e-2)


def test_mlp_channels_cut_reach_a_stock_checkpoint(isolated_cache, tmp_path):
    """diet prune --mlp-sparsity 0.5: every layer keeps 40 of 80 channels, the record says so, and stock
    transformers loads the saved checkpoint and computes the pruned model's logits."""
    from transformers import AutoModelForCausalLM

    import dietprune
    from dietprune.report import prune_summary_text

    tok = tiny_tokenizer()
    options = dict(sparsity=0.25, samples=4, tasks=("rte", "boolq"), recover_samples=2)
    pruned = dietprune.prune(tiny_model("gemma3_text"), tok, mlp_sparsity=0.5, **options)
    assert pruned.model.config.intermediate_size == 40
    assert pruned.record["recovery"]["mlp_channels_kept"] == 40
    summary = prune_summary_text(pruned.record)
    assert "(readers, writers, norms, head, 40 MLP channels kept a layer)" in summary
    assert pruned.record["params_after"] == sum(p.numel() for p in pruned.model.parameters())
    dietprune.save(pruned, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    batch = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, pruned.model(**batch).logits, atol=1e-5)


def test_the_damping_grid_chooses_by_the_held_out_batches():
    """A fit whose held-out batches follow the same map as the others takes the least damping; one whose
    held-out targets follow the prior (the plain slice) instead takes the most."""
    from dietprune.recover import _chosen, _held_out_fits

    torch.manual_seed(0)
    x = [torch.randn(50, 6, dtype=torch.float64) for _ in range(2)]  # the fit batches, the held-out ones
    true, prior = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def statistics(held_map):
        targets = [x[0] @ true.T, x[1] @ held_map.T]
        gram = torch.stack([x[0].T @ x[0] + x[1].T @ x[1], x[1].T @ x[1]]).tril()
        rhs = torch.stack([targets[0].T @ x[0] + targets[1].T @ x[1], targets[1].T @ x[1]])
        return gram, rhs

    def chosen(held_map):
        gram, rhs = statistics(held_map)
        return _chosen(*_held_out_fits(gram, (1e-3, 1.0, 1e3)), rhs, prior)

    assert chosen(true) == 1e-3
    assert chosen(prior) == 1e3


def test_a_one_value_grid_is_that_fixed_damping():
    """The chosen damping refits on every batch: a grid of one value gives the model that value gives,
    and every reader's and writer's choice is returned."""
    model = tiny_model("gemma3_text")
    fixed = recovered(model, TEXTS, KEEP, PARTS, alpha=0.1, rows=2).state_dict()
    gridded = recovered(model, TEXTS, KEEP, PARTS, alpha=0.1, rows=2, grid=(0.1,)).state_dict()
    assert all(torch.equal(fixed[k], gridded[k]) for k in fixed)
    other = recovered(model, TEXTS, KEEP, PARTS, alpha=0.1, rows=2, grid=(10.0,)).state_dict()
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(fixed[down], other[down])


def test_the_grid_choices_are_recorded(isolated_cache):
    import dietprune

    options = dict(sparsity=0.25, samples=4, tasks=("rte", "boolq"), recover_samples=4, batch_size=1)
    pruned = dietprune.prune(tiny_model("llama"), tiny_tokenizer(), recover_alpha_grid=(0.01, 1.0), **options)
    chosen = pruned.record["recovery"]["alpha_chosen"]
    assert sum(chosen.values()) == 3 * (3 + 1 + 2 + 1)  # 3 layers: q, k, v, o, then gate, up, down
