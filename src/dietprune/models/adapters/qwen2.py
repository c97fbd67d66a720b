"""Qwen2: Llama's residual anatomy; q/k/v biases lie on the head axis, not the residual."""

from dataclasses import replace

from dietprune.models.adapters.llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, name="qwen2", model_types=("qwen2",))
