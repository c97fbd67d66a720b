"""The sequential engine: sub-blocks compute what the layers compute, each block is read once per pass,
and a model streamed from its files prunes to the checkpoint the in-memory path gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, FAST_PROFILE, VOCAB, batching, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dietprune
from dietprune.calibration import token_batches
from dietprune.cli import main
from dietprune.models.load import load_model
from dietprune.models.store import Checkpoint
from dietprune.pipeline import Pruned
from dietprune.sequential import Observer, Weights, capture, observe, run_layer

TEXTS = ["the a is of b c", "Question: is the a ? Answer: yes", "a b c d e f g h i j k", "x y z"]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_a_layer_run_as_its_sub_blocks_is_the_layer(model_type):
    """Every adapter's decoder layer, run by the engine as h + output_norm(module(norm(h))) twice,
    computes what its own forward computes, with the keyword arguments the decoder gives it."""
    model = tiny_model(model_type)
    weights = Weights.of(model)
    stream = capture(weights, token_batches(tiny_tokenizer(), TEXTS, batching(2)))
    with torch.no_grad():
        for b, hidden in enumerate(stream.hidden):
            for i, layer in enumerate(weights.blocks):
                kwargs = stream.kwargs[b][i]
                want = layer(hidden, **kwargs)
                got = run_layer(layer, weights.adapter, hidden, kwargs)
                assert torch.equal(got, want), (model_type, i)
                hidden = want


class Counting(Observer):
    """Counts how often each block is brought in and how many tokens each tap sees."""

    sites = frozenset({"block_input", "block_output", "norm_output", "writer_input"})

    def __init__(self):
        self.blocks: list[int] = []
        self.tokens: dict[str, int] = {}

    def block(self, index, layer):
        self.blocks.append(index)

    def observe(self, index, site, sub, x, group):
        self.tokens[site] = self.tokens.get(site, 0) + len(x)


def test_each_block_is_read_once_and_taps_see_real_tokens_only():
    model = tiny_model("gemma3_text")
    weights = Weights.of(model)
    stream = capture(weights, token_batches(tiny_tokenizer(), TEXTS, batching(3)))
    observer = Counting()
    observe(weights, stream, [observer])
    real = stream.tokens()
    assert real == sum(len(tiny_tokenizer()(t)["input_ids"]) for t in TEXTS)
    assert observer.blocks == [0, 1, 2]
    layers = model.config.num_hidden_layers
    assert observer.tokens == {"block_input": real * (layers + 1), "block_output": real * layers,
                               "norm_output": 2 * real * layers, "writer_input": 2 * real * layers}


def test_capture_reads_no_block_weights(tmp_path):
    """The stream entering block 0 comes from the embedding alone: a streamed model's blocks stay on
    the meta device while it is captured."""
    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), stream=True)
    weights = Weights(loaded.model, torch.device("cpu"), torch.float32, loaded.checkpoint)
    stream = capture(weights, token_batches(tiny_tokenizer(), TEXTS, batching()))
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    expected = tiny_model("llama").get_input_embeddings()(token_batches(tiny_tokenizer(), TEXTS,
                                                                         batching())[0]["input_ids"])
    assert torch.equal(stream.hidden[0], expected)


@pytest.mark.parametrize("options", [["--recover", "none"], ["--recover", "full"],
                                     ["--mlp-sparsity", "0.25"], ["--recover-head", "linear"]],
                         ids=["none", "full", "mlp", "linear-head"])
@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2"])
def test_a_streamed_prune_writes_the_checkpoint_of_the_in_memory_prune(model_type, options, tmp_path,
                                                                       isolated_cache):
    """--weights stream (blocks read from the files, the pruned blocks written straight to the output)
    gives the checkpoint --weights load gives: same mask, same tensors, same saved form (MLP channels
    cut too, with --mlp-sparsity; the head refit as a map, tied to the embedding or not)."""
    source = tmp_path / "dense"
    tiny_model(model_type).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    for weights in ("load", "stream"):
        assert main(["--quiet", "prune", "--model", str(source), "--out", str(tmp_path / weights),
                     "--weights", weights, *options, "--recover-samples", "2",
                     *FAST_PROFILE]) == 0
    records = {w: json.loads((tmp_path / w / "dietprune.json").read_text()) for w in ("load", "stream")}
    assert records["load"]["kept_dims"] == records["stream"]["kept_dims"]
    assert records["load"].get("saved_as") == records["stream"].get("saved_as")
    assert records["load"]["params_after"] == records["stream"]["params_after"]
    files = {w: Checkpoint(tmp_path / w) for w in ("load", "stream")}
    assert set(files["load"].files) == set(files["stream"].files)
    for name in files["load"].files:
        a, b = (files[w].read([name], torch.device("cpu"))[name] for w in ("load", "stream"))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1  # a shard per block
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert stock.config.hidden_size == records["stream"]["hidden_size_after"] < 48
    assert stock.config.intermediate_size == (60 if "--mlp-sparsity" in options else 80)


def test_a_checkpoint_written_tensor_by_tensor_is_what_save_pretrained_writes(tmp_path):
    """The writer converts each tensor on the host as it goes: the same tensors, tied head dropped,
    the saved dtype recorded in config.json."""
    model = tiny_model("gemma3_text")
    pruned = Pruned(model, tiny_tokenizer(), {"format": "test"}, torch.bfloat16)
    dietprune.save(pruned, tmp_path / "ours")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / n / "model.safetensors") for n in ("ours", "theirs"))
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["Gemma3ForCausalLM"]


GOLDEN = json.loads((Path(__file__).parent / "data" / "pre_engine.json").read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_the_engine_prunes_as_the_code_before_it(case, isolated_cache, monkeypatch):
    """Every adapter, method and recovery mode, against what the code before the sequential engine
    (commit 2eacd34: hooked whole-model passes, recovery re-running each layer per refit) gave on the
    same tiny model and calibration samples: the same kept dims, parameter count and logits, with
    recovery's statistics all in float64 as that code took them; with the default float32 products
    (lstsq.PRODUCTS) the logits move by float32 rounding times these tiny systems' conditioning."""
    model_type, method, recover = case.split("/")
    want = GOLDEN["cases"][case]
    expected = torch.tensor(want["logits"])
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(GOLDEN["input_ids_seed"]))
    for products, tolerance in ((torch.float64, 1e-4), (torch.float32, 3e-3)):
        monkeypatch.setattr("dietprune.lstsq.PRODUCTS", products)
        pruned = dietprune.prune(tiny_model(model_type), tiny_tokenizer(), sparsity=0.25, samples=4,
                                 recover_samples=2, recover_generic=0, recover_alpha=0.01,  # that code's
                                 tasks=("arc_easy", "rte"), method=method, recover=recover)
        with torch.no_grad():
            logits = pruned.model(ids).logits[0, :, :16]
        assert pruned.record["kept_dims"] == want["kept_dims"]
        assert pruned.record["params_after"] == want["params_after"]
        assert torch.allclose(logits, expected, rtol=tolerance, atol=tolerance * expected.abs().max()), \
            (products, (logits - expected).abs().max())
