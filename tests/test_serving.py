"""The saved form of every architecture runs in the serving engines: each engine's rule for the fields
it derives instead of reading (docs/SERVING.md) holds for every saved checkpoint, and the rewrites that
make it hold change no logit in transformers. llama.cpp itself runs in `make test-serving`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HIDDEN, logits, stock_logits, tiny_model, tiny_tokenizer

from dietprune.api import Pruned, save
from dietprune.mask import masked
from dietprune.models.edit import head_dim
from dietprune.slice import slice_model

KEEP = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:36]  # 36 != 4 heads x 8
LAYERS_OF_27B = {"gemma2": 46, "gemma3_text": 62}  # llama.cpp's LLM_TYPE_27B, by layer count


def engine_rules(config: dict) -> dict[str, bool]:
    """What llama.cpp and vLLM compute from hidden_size instead of reading, per their model code."""
    heads, hidden, arch = config["num_attention_heads"], config["hidden_size"], config["model_type"]
    rules = {"head_dim written": "head_dim" in config}
    if arch == "qwen2":  # llama.cpp src/models/qwen2.cpp Q/O {n_embd, n_embd}; vLLM qwen2.py head_dim
        rules["qwen2 head_dim = hidden / heads"] = hidden == heads * config["head_dim"]
    if arch in LAYERS_OF_27B:  # llama.cpp gemma2.cpp / gemma3.cpp attention scale
        scale = hidden // heads if config["num_hidden_layers"] == LAYERS_OF_27B[arch] else config["head_dim"]
        rules["llama.cpp attention scale = query_pre_attn_scalar"] = scale == config["query_pre_attn_scalar"]
    return rules


CASES = [("gemma", {}), ("gemma2", {}), ("gemma3_text", {}), ("llama", {}), ("mistral", {}), ("qwen2", {}),
         ("qwen3", {}), ("gemma2", {"num_hidden_layers": 46, "query_pre_attn_scalar": 12}),
         ("gemma3_text", {"num_hidden_layers": 62, "query_pre_attn_scalar": 12})]


@pytest.mark.parametrize(("model_type", "overrides"), CASES,
                         ids=[f"{t}-{o.get('num_hidden_layers', 3)}layers" for t, o in CASES])
def test_saved_checkpoints_follow_the_engines_rules_and_keep_their_logits(model_type, overrides, input_ids,
                                                                           tmp_path):
    if "num_hidden_layers" in overrides:
        overrides = overrides | {"layer_types": ["sliding_attention", "full_attention"] * 31}
        overrides["layer_types"] = overrides["layer_types"][:overrides["num_hidden_layers"]]
    model = tiny_model(model_type, **overrides)
    with masked(model, KEEP):
        want = logits(model, input_ids)
    sliced = slice_model(model, KEEP)
    save(Pruned(sliced, tiny_tokenizer(), {"kept_dims": KEEP.tolist()}, torch.float32), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert all(engine_rules(config).values()), engine_rules(config)
    record = json.loads((tmp_path / "p" / "dietprune.json").read_text())
    got = stock_logits([tmp_path / "p"], input_ids)[str(tmp_path / "p")]
    assert (got - want).abs().max() < 5e-4  # fp32 rounding over 62 layers; a wrong scale: ~0.1
    rewritten = model_type == "qwen2" or "num_hidden_layers" in overrides
    assert ("saved_as" in record) == rewritten
    if model_type == "qwen2":
        assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"] is True
        assert record["saved_as"]["architecture"] == "LlamaForCausalLM"
        assert not {"sliding_window", "use_sliding_window", "layer_types"} & set(config)


def test_a_qwen2_whose_width_still_fits_its_heads_stays_qwen2(tmp_path):
    model = tiny_model("qwen2", head_dim=12)  # 4 heads x 12 = 48 = hidden: nothing for an engine to misread
    assert head_dim(model.config) * 4 == HIDDEN
    save(Pruned(model, tiny_tokenizer(), {}, torch.float32), tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
