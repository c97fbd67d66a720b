"""SliceGPT-style rotation: exact before slicing, stock checkpoints, parameter budget, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_PROFILE, batching, logits, stock_logits, tiny_model, tiny_tokenizer

from dietprune.assemble import applied
from dietprune.errors import DietError
from dietprune.methods import METHODS
from dietprune.methods.base import observed, prune_structure
from dietprune.methods.slicegpt import Covariance, rotation
from dietprune.models.edit import count_params
from dietprune.sequential import Weights
from dietprune.slice import slice_model, sliced_param_count

TEXTS = ["the a is b of c .", "Question: is the x y ? Answer: yes", "a b c d e f g h i j k",
         "the c is no d", "True False yes no , the of a"]
PRE_NORM = ("gemma", "llama", "mistral", "qwen2", "qwen3")


def slicegpt(model, target: int, texts=TEXTS):
    return prune_structure(METHODS["slicegpt"], model, tiny_tokenizer(), texts, target, batching())


def random_rotation(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return q


@pytest.mark.parametrize("model_type", PRE_NORM)
def test_rotation_preserves_the_function(model_type, input_ids):
    model = tiny_model(model_type)
    rotated = applied(model, rotation(model, random_rotation(model.config.hidden_size)))
    assert (logits(rotated, input_ids) - logits(model, input_ids)).abs().max() < 1e-4
    assert not rotated.config.tie_word_embeddings
    assert rotated.get_output_embeddings().weight is not rotated.get_input_embeddings().weight


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_post_norm_architectures_are_refused(model_type):
    with pytest.raises(DietError, match="post-norms"):
        rotation(tiny_model(model_type), torch.eye(48))


def test_covariance_is_the_sum_over_all_stream_sites():
    model = tiny_model("llama")
    ids = tiny_tokenizer()(TEXTS[:1], return_tensors="pt")["input_ids"]
    final_input = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: final_input.append(args[0][0]))
    with torch.no_grad():
        layer_inputs = model(ids, output_hidden_states=True).hidden_states[:-1]  # embeddings, layers 0..n-2
    handle.remove()
    expected = sum(x.double().T @ x.double() for x in [*(h[0] for h in layer_inputs), final_input[0]])
    assert len(layer_inputs) == model.config.num_hidden_layers
    covariance = observed(Covariance(model, 0), Weights.of(model), tiny_tokenizer(), TEXTS[:1], batching(),
                          "test")[0].total
    assert torch.allclose(covariance, expected, rtol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_slicegpt_fits_the_budget_and_saves_a_stock_checkpoint(model_type, input_ids, tmp_path):
    model = tiny_model(model_type)
    target = sliced_param_count(model, 36)  # DIET's size at 25%
    pruned, record = slicegpt(model, target)
    assert count_params(pruned) <= target
    assert record["hidden_size"] % 4 == 0 and pruned.config.hidden_size == record["hidden_size"]
    assert 0 < record["explained_variance"] < 1
    pruned.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    stock = stock_logits([tmp_path / "m"], input_ids)
    assert (stock[str(tmp_path / "m")] - logits(pruned, input_ids)).abs().max() < 1e-4


def test_tied_head_costs_width():
    """Untying the head spends part of the budget: K is below DIET's for a tied model, not for an untied."""
    tied, untied = tiny_model("llama", tie_word_embeddings=True), tiny_model("llama")
    for model, expect_below in ((tied, True), (untied, False)):
        _, record = slicegpt(model, sliced_param_count(model, 36))
        assert record["untied_head"] is expect_below
        assert (record["hidden_size"] < 36) is expect_below


def test_principal_axes_keep_more_than_any_other_slice(input_ids):
    """The rotated slice loses less than slicing the same width of the unrotated stream."""
    reference = logits(tiny_model("llama"), input_ids)
    target = sliced_param_count(tiny_model("llama"), 24)
    rotated, _ = slicegpt(tiny_model("llama"), target, TEXTS * 4)
    plain = slice_model(tiny_model("llama"), torch.arange(rotated.config.hidden_size))
    error = {name: (logits(m, input_ids) - reference).square().mean() for name, m in
             (("rotated", rotated), ("plain", plain))}
    assert error["rotated"] < error["plain"]


def test_prune_method_slicegpt(tmp_path, capsys):
    from dietprune.cli import main

    tiny_model("llama").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    argv = ["--quiet", "prune", "--model", str(tmp_path / "llama"), "--method", "slicegpt",
            "--sparsity", "0.25", *FAST_PROFILE]
    records = []
    for out in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / out)]) == 0
        records.append(json.loads((tmp_path / out / "dietprune.json").read_text()))
    assert records[0]["structure"] == records[1]["structure"]  # deterministic
    assert records[0]["params_after"] <= sliced_param_count(tiny_model("llama"), 36)
    assert records[0]["hidden_size_after"] == records[0]["structure"]["hidden_size"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c"), "--recover", "lsq"]) == 2
    assert "--recover does not apply" in capsys.readouterr().err


def test_prune_method_slicegpt_refuses_gemma3(tiny_dir, tmp_path, capsys):
    from dietprune.cli import main

    assert main(["--quiet", "prune", "--model", str(tiny_dir), "--method", "slicegpt", "--out",
                 str(tmp_path / "o"), *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    assert "post-norms" in err and "\n" not in err and not (tmp_path / "o").exists()
