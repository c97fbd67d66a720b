"""Masked vs sliced max |logit difference| per architecture (the invariant the tests assert), printed.

    .venv/bin/python benchmarks/slice_equivalence.py

Tiny random models of every adapter (from tests/conftest.py, 32 of 48 dims kept) and the two real
embedded models (a seeded random mask at 20%), fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import CONFIGS, HIDDEN, VOCAB, tiny_model  # noqa: E402

from dietprune.mask import masked  # noqa: E402
from dietprune.models.load import load_model  # noqa: E402
from dietprune.slice import slice_model  # noqa: E402

PROMPTS = ["The capital of France is", "Question: is the sky blue?\nAnswer:"]


@torch.inference_mode()
def max_difference(model, inputs: dict, keep: torch.Tensor) -> tuple[float, float, bool]:
    """(max |sliced - masked| over real tokens, max |masked logit|, argmax identical)."""
    with masked(model, keep):
        expected = model(**inputs).logits
    got = slice_model(model, keep)(**inputs).logits
    real = inputs.get("attention_mask", torch.ones(got.shape[:2])).bool()
    diff = (got - expected)[real].abs().max().item()
    same = bool((got[real].argmax(-1) == expected[real].argmax(-1)).all())
    return diff, expected[real].abs().max().item(), same


def main() -> None:
    torch.set_flush_denormal(True)
    keep = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:32]
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    for model_type in sorted(CONFIGS):
        diff, scale, _ = max_difference(tiny_model(model_type), {"input_ids": ids}, keep)
        print(f"{model_type}: max |delta logit| {diff:.1e} (logits up to {scale:.1f})")
    for name, k in (("gemma-3-270m", 512), ("smollm2-135m", 459)):
        loaded = load_model(name)
        model, tokenizer = loaded.model, loaded.tokenizer
        inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        keep = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(0))[:k]
        diff, scale, same = max_difference(model, dict(inputs), keep)
        print(f"{name} K={k}: max |delta logit| {diff:.1e} (logits up to {scale:.1f}), "
              f"argmax identical: {same}")


if __name__ == "__main__":
    main()
