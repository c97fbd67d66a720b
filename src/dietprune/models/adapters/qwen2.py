"""Qwen2: Llama's residual anatomy; q/k/v biases lie on the head axis, not the residual. Saved as Llama
when pruned, for the engines (models/serving.py)."""

from dataclasses import replace

from dietprune.models.adapters.llama import ADAPTER as LLAMA
from dietprune.models.serving import qwen2_as_llama

ADAPTER = replace(LLAMA, name="qwen2", model_types=("qwen2",), serving=qwen2_as_llama)
