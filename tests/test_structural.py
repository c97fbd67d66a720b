"""ShortGPT and Wanda-SP: parameter targets, stock checkpoints, and what they remove first."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS, batching, logits, stock_logits, tiny_model, tiny_tokenizer

from dietprune.errors import DietError
from dietprune.methods import METHODS as REGISTRY
from dietprune.methods.base import observed, prune_structure
from dietprune.methods.shortgpt import BlockInfluence
from dietprune.methods.wanda_sp import WandaSP
from dietprune.models.edit import count_params
from dietprune.sequential import Weights

TEXTS = ["the a is b of c .", "Question: is the x y ? Answer: yes", "no", "a b c d e f g h i j k",
         "the c is no d", "True False yes no , the of a"]
METHODS = {"shortgpt": REGISTRY["shortgpt"], "wanda_sp": REGISTRY["wanda-sp"]}
UNIT = {"shortgpt": "layer_params", "wanda_sp": "channel_params"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only waits on the other (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prune(method: str, model, fraction: float):
    target = round(fraction * count_params(model))
    return prune_structure(METHODS[method], model, tiny_tokenizer(), TEXTS, target, batching())


@pytest.mark.parametrize("fraction", [0.8, 0.5])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_count_is_nearest_to_the_target(method, model_type, fraction, input_ids):
    model = tiny_model(model_type)
    pruned, record = prune(method, model, fraction)
    json.dumps(record)
    after = count_params(pruned)
    assert after < record["params_before"] == count_params(model)
    assert abs(after - record["target_params"]) <= record[UNIT[method]] / 2
    assert logits(pruned, input_ids).isfinite().all()
    if method == "wanda_sp" and fraction == 0.5:
        assert record["heads_after"] < record["heads_before"]  # heads really go, too


@pytest.mark.parametrize("method", sorted(METHODS))
def test_target_equal_to_the_model_removes_nothing(method, model_type, input_ids):
    model = tiny_model(model_type)
    pruned, record = prune(method, model, 1.0)
    assert count_params(pruned) == count_params(model)
    assert record.get("removed_layers", []) == []
    assert record.get("intermediate_after") == record.get("intermediate_before")
    assert (logits(pruned, input_ids) - logits(model, input_ids)).abs().max() < 1e-5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic(method, model_type):
    first = prune(method, tiny_model(model_type), 0.5)[1]
    second = prune(method, tiny_model(model_type), 0.5)[1]
    assert first == second


@pytest.mark.parametrize("observer", [BlockInfluence, WandaSP])
def test_padding_does_not_count(observer):
    model = tiny_model("gemma3_text")
    target = round(0.8 * count_params(model))
    one, padded = (observed(observer(model, target), Weights.of(model), tiny_tokenizer(), TEXTS,
                            batching(b), "test")[0] for b in (1, len(TEXTS)))
    results = one.result(), padded.result()
    for a, b in zip(*results, strict=True) if observer is WandaSP else [results]:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoints_load_in_stock_transformers(tmp_path, input_ids):
    """Every architecture and method, loaded in a process that never imports dietprune."""
    expected = {}
    for model_type in sorted(CONFIGS):
        for method in sorted(METHODS):
            pruned, record = prune(method, tiny_model(model_type), 0.5)
            name = f"{model_type}-{method}"
            expected[name] = logits(pruned, input_ids)
            pruned.save_pretrained(tmp_path / name)
            config = json.loads((tmp_path / name / "config.json").read_text())
            assert config["head_dim"] == 8
            layers = pruned.get_decoder().layers
            assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
            assert config["num_hidden_layers"] == len(layers) == 3 - len(record.get("removed_layers", []))
    loaded = stock_logits([tmp_path / name for name in expected], input_ids)
    for name, want in expected.items():
        assert (loaded[str(tmp_path / name)] - want).abs().max() < 1e-5, name


def test_shortgpt_removes_an_identity_layer_first(model_type, input_ids):
    model = tiny_model(model_type)
    layer = model.get_decoder().layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    per_layer = count_params(layer)
    pruned, record = prune_structure(METHODS["shortgpt"], model, tiny_tokenizer(), TEXTS,
                                     count_params(model) - per_layer, batching())
    assert record["removed_layers"] == [1]
    assert record["block_influence"][1] < 1e-6 < min(record["block_influence"][::2])
    types = getattr(model.config, "layer_types", None)
    if types is not None:  # Gemma-2/3 alternate sliding and full attention: the entries follow the layers
        assert pruned.config.layer_types == [types[0], types[2]]
    # the layer did nothing, so the model without it computes the same (masks and positions included)
    assert (logits(pruned, input_ids) - logits(model, input_ids)).abs().max() < 1e-5


def test_wanda_sp_removes_a_silenced_channel_first(model_type, input_ids):
    model = tiny_model(model_type)
    silenced = [5, 40, 79]
    with torch.no_grad():
        for layer, channel in zip(model.get_decoder().layers, silenced, strict=True):
            layer.mlp.down_proj.weight[:, channel] = 0
    _, first = prune("wanda_sp", model, 1.0)
    pruned, record = prune_structure(METHODS["wanda_sp"], model, tiny_tokenizer(), TEXTS,
                                     count_params(model) - first["channel_params"], batching())
    assert record["intermediate_after"] == 79 and record["heads_after"] == 4
    for kept, channel in zip(record["kept_channels"], silenced, strict=True):
        assert kept == [c for c in range(80) if c != channel]
    assert (logits(pruned, input_ids) - logits(model, input_ids)).abs().max() < 1e-5


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_wanda_sp_removes_silenced_heads_and_channels_exactly(model_type, kv_heads, input_ids):
    """Silence as many heads (evenly per KV group) and channels per layer as the target removes: exactly
    those go, and the pruned model computes what the silenced one computes. kv_heads=4: no GQA."""
    model = tiny_model(model_type, num_key_value_heads=kv_heads)
    counts = prune("wanda_sp", model, 0.5)[1]  # how many go depends only on shapes and target
    group = 4 // (1 if kv_heads == 4 else kv_heads)
    heads_cut = (4 - counts["heads_after"]) * group // 4
    channels_cut = 80 - counts["intermediate_after"]
    assert heads_cut > 0 and channels_cut > 0
    gone_heads, gone_channels = [], []
    with torch.no_grad():
        for i, layer in enumerate(model.get_decoder().layers):
            heads = [g + (i + k) % group for g in range(0, 4, group) for k in range(heads_cut)]
            channels = [(7 * i + 3 * k) % 80 for k in range(channels_cut)]
            for h in heads:
                layer.self_attn.o_proj.weight[:, 8 * h:8 * h + 8] = 0
            layer.mlp.down_proj.weight[:, channels] = 0
            gone_heads.append(sorted(heads))
            gone_channels.append(sorted(channels))
    pruned, record = prune("wanda_sp", model, 0.5)
    assert record["kv_heads_after"] == (record["heads_after"] if kv_heads == 4 else kv_heads)
    for kept, gone in zip(record["kept_heads"], gone_heads, strict=True):
        assert kept == [h for h in range(4) if h not in gone]
    for kept, gone in zip(record["kept_channels"], gone_channels, strict=True):
        assert kept == [c for c in range(80) if c not in gone]
    assert (logits(pruned, input_ids) - logits(model, input_ids)).abs().max() < 1e-5


def test_wanda_sp_removes_query_heads_evenly_from_each_kv_group(model_type, input_ids):
    """Even when one KV group holds the least important heads, each group loses the same number."""
    model = tiny_model(model_type)
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            layer.self_attn.o_proj.weight[:, :16] *= 1e-3  # heads 0 and 1, both of KV head 0
    pruned, record = prune("wanda_sp", model, 0.5)
    assert record["heads_after"] == 2 and record["kv_heads_after"] == 2
    for kept in record["kept_heads"]:
        assert kept[0] in (0, 1) and kept[1] in (2, 3)
    assert logits(pruned, input_ids).isfinite().all()


def test_wanda_sp_skips_head_counts_the_config_rejects():
    """Without GQA, 3 of 4 heads suit a width of 48 but fail transformers' hidden_size % heads check at 40."""
    def heads(hidden: int) -> set[int]:
        model = tiny_model("llama", hidden_size=hidden, num_key_value_heads=4)
        return {prune("wanda_sp", model, f)[1]["heads_after"] for f in (0.85, 0.8, 0.7)}

    assert 3 in heads(48)
    narrow = heads(40)
    assert 3 not in narrow and len(narrow) > 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unreachable_target_is_an_error(method):
    with pytest.raises(DietError, match="must stay"):
        prune(method, tiny_model("llama"), 0.01)
