"""The invariants on the real embedded models (GGUF from PyPI packages, converted once and cached)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dietprune.mask import masked
from dietprune.models.load import load_model
from dietprune.slice import slice_model

PROMPTS = ["The capital of France is", "Question: Is the sky blue?\nAnswer:",
           "A man is sitting on a roof. He"]
KEPT = {"gemma-3-270m": 512, "smollm2-135m": 432}  # 20% of 640; 25% of 576 (a multiple of 9 heads x 8)
# fp32 logits reach ~40; the sliced model sums fewer terms in another order (fp64 differs by ~1e-5).
LOGIT_TOLERANCE = 1e-2


@pytest.fixture(scope="module", params=sorted(KEPT))
def real(request):
    loaded = load_model(request.param)
    model, tokenizer = loaded.model, loaded.tokenizer
    keep = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return model, tokenizer, keep[: KEPT[request.param]]


def test_sliced_equals_masked(real):
    model, tokenizer, keep = real
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real_tokens = batch["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**batch).logits[real_tokens]
        with masked(model, keep):
            expected = model(**batch).logits[real_tokens]
        got = slice_model(model, keep)(**batch).logits[real_tokens]
    assert (got - expected).abs().max() < LOGIT_TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (dense - expected).abs().max() > 1.0  # pruning 20% is not a no-op


def test_parameter_count(real):
    model, _, keep = real
    d, k = model.config.hidden_size, len(keep)
    sliced = slice_model(model, keep)
    per_dim = sum(p.numel() // d for p in model.parameters() if d in p.shape)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in sliced.parameters()) == before - per_dim * (d - k)
    if model.config.model_type == "gemma3_text":
        assert before == 268_098_176 and before - per_dim * (d - k) == 214_480_384


def test_checkpoint_loads_in_a_fresh_process_without_dietprune(real, tmp_path):
    model, tokenizer, keep = real
    sliced = slice_model(model, keep)
    sliced.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = sliced(ids).logits[0, -1]
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
ids = AutoTokenizer.from_pretrained({str(tmp_path)!r})({PROMPTS[0]!r}, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0, -1]
assert not any(name.startswith("dietprune") for name in sys.modules)
print(json.dumps({{"hidden": model.config.hidden_size, "logits": logits.tolist()}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["hidden"] == len(keep)
    assert (torch.tensor(loaded["logits"]) - expected).abs().max() < 1e-4
