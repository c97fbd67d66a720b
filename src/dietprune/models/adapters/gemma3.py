"""Gemma-3 text models: Gemma-2's anatomy; q_norm/k_norm act on head_dim, not on the residual."""

from dataclasses import replace

from dietprune.models.adapters.gemma2 import ADAPTER as GEMMA2

ADAPTER = replace(GEMMA2, name="gemma3", model_types=("gemma3_text",))
