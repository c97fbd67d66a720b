"""Qwen3: Llama's residual anatomy; q_norm/k_norm act on head_dim, not the residual."""

from dataclasses import replace

from dietprune.models.adapters.llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, name="qwen3", model_types=("qwen3",))
