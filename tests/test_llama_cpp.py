"""Pruned checkpoints in llama.cpp (`make test-serving`; builds llama.cpp once, ~10 min): every adapter's
tiny model and both embedded models, pruned and saved by dietprune, converted by llama.cpp's own
converter and run by llama.cpp, give transformers' next-token logits (argmax identical, fp32)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp  # noqa: E402  (benchmarks/llama_cpp.py)

from dietprune import api  # noqa: E402

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module", autouse=True)
def built():
    llama_cpp.build()


@pytest.fixture(scope="module")
def tokenizers():
    return {name: api.load(name).tokenizer for name in ("gemma-3-270m", "smollm2-135m")}


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    """llama.cpp's Gemma and Gemma-2 converters read the vocabulary from a sentencepiece tokenizer.model
    (Gemma-3's reads tokenizer.json); a small one is trained here."""
    import io
    import random

    import sentencepiece

    rng = random.Random(0)
    words = ["the", "cat", "dog", "runs", "fast", "model", "prune", "hidden", "size", "head", "question",
             "answer", "yes", "no", "sky", "blue"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choices(words, k=12)) for _ in range(2000)), model_writer=model,
        vocab_size=384, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    return model.getvalue()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_adapter_pruned_runs_in_llama_cpp(model_type, tokenizers, sentencepiece_model, tmp_path):
    """Pruned 48 -> 36 wide with 4 heads of 16, so hidden != heads * head_dim. llama.cpp does not read
    the layer pattern (Gemma-3: every 6th layer global, with its own rope base), so the tiny Gemma-3's
    three layers are all local, as llama.cpp assumes; windows are longer than the prompts."""
    sentencepiece_vocab = model_type in ("gemma", "gemma2")
    tokenizer = tokenizers["gemma-3-270m" if model_type.startswith("gemma") else "smollm2-135m"]
    overrides = {"sliding_window": 512} if model_type in ("gemma2", "gemma3_text", "qwen2") else {}
    if model_type in ("gemma2", "gemma3_text"):
        overrides["query_pre_attn_scalar"] = 16  # = head_dim, as in every released non-27B Gemma
    if model_type == "gemma3_text":
        overrides["layer_types"] = ["sliding_attention"] * 3
    model = tiny_model(model_type, vocab_size=384 if sentencepiece_vocab else len(tokenizer), head_dim=16,
                       max_position_embeddings=512, initializer_range=0.05, **overrides)
    pruned = api.prune(model, tiny_tokenizer() if sentencepiece_vocab else tokenizer, sparsity=0.25,
                       samples=4, tasks=("rte",))
    api.save(pruned, tmp_path / model_type)
    tokens = None
    if sentencepiece_vocab:
        (tmp_path / model_type / "tokenizer.model").write_bytes(sentencepiece_model)
        tokens = [[2, 17, 250, 33, 91, 5, 120], [2, 300, 8, 64, 77]]
    result = llama_cpp.compare(tmp_path / model_type, tokens)
    assert result["argmax_agrees"], result
    assert result["max_abs_delta_logit"] < 5e-3 * max(1.0, result["logit_scale"]), result


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m"])
def test_embedded_models_pruned_run_in_llama_cpp(name, tmp_path):
    api.save(api.prune(name, sparsity=0.2, samples=16), tmp_path / name)
    result = llama_cpp.compare(tmp_path / name)
    assert result["argmax_agrees"] and result["max_abs_delta_logit"] < 1e-2 * max(1.0, result["logit_scale"])
