"""Pruned checkpoints in llama.cpp (`make test-serving`; builds llama.cpp once, ~10 min): every adapter's
tiny model and both embedded models, pruned and saved by dietprune, converted by llama.cpp's own
converter and run by llama.cpp, give transformers' next-token logits (argmax identical, fp32). The
embedded models also quantise with llama-quantize to Q8_0 and Q4_K_M as their width record says (no
tensor of K-wide rows falls back to another type where the record says the alignment is met; where it
is not, the fallback is there) and their top 5 next tokens hold the unquantised pruned model's."""

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


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each embedded model pruned by 20% (default width and recovery), saved: its folder and record."""
    out = {}
    for name in ("gemma-3-270m", "smollm2-135m"):
        pruned = api.prune(name, sparsity=0.2, samples=16)
        out[name] = (api.save(pruned, tmp_path_factory.mktemp("embedded") / name), pruned.record)
    return out


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m"])
def test_embedded_models_pruned_run_in_llama_cpp(name, embedded):
    result = llama_cpp.compare(embedded[name][0])
    assert result["argmax_agrees"] and result["max_abs_delta_logit"] < 1e-2 * max(1.0, result["logit_scale"])


@pytest.mark.parametrize("qtype, needs", [("Q4_K_M", "llama.cpp k-quants"),
                                          ("Q8_0", "llama.cpp Q8_0/Q5_0/Q4_0")])
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m"])
def test_embedded_models_pruned_quantise_as_recorded(name, qtype, needs, embedded):
    """Gemma-3 270M keeps K = 512: no tensor falls back. SmolLM2's 9 heads leave K = 459, a multiple of
    neither 256 nor 32: the record says so, and K-wide tensors fall back to F16 (no others do)."""
    checkpoint, record = embedded[name]
    width = record["width"]
    gguf, fallbacks = llama_cpp.quantize(llama_cpp.convert(checkpoint, "f16"), qtype)
    at_k = [f for f in fallbacks if f["ncols"] == width["kept"]]
    assert bool(at_k) == (not width["serving"][needs]), fallbacks
    assert bool([f for f in at_k if f["got"] == "f16"]) == (not width["serving"]["llama.cpp Q8_0/Q5_0/Q4_0"])
    assert all(f["got"] != "f16" for f in fallbacks if f["ncols"] != width["kept"]), fallbacks
    if name == "gemma-3-270m":
        assert width["kept"] == 512 and fallbacks == []
    else:
        assert width["kept"] == 459 and "the dense 576 is a multiple of 32 and 8" in width["why"]
    # the quantised model against the unquantised one: its top 5 hold the next token (the argmax itself can
    # flip on a near tie: the dense Gemma's Q8_0 does on one of the three prompts)
    assert llama_cpp.compare(checkpoint, gguf=gguf)["top5_holds_argmax"]
