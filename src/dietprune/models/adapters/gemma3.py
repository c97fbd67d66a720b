"""Gemma-3 text models: Gemma-2's anatomy; q_norm/k_norm act on head_dim, not on the residual."""

from dataclasses import replace
from functools import partial

from dietprune.models.adapters.gemma2 import ADAPTER as GEMMA2
from dietprune.models.serving import gemma_attention_scale

ADAPTER = replace(GEMMA2, name="gemma3", model_types=("gemma3_text",),
                  serving=partial(gemma_attention_scale, layers_of_27b=62, q_norm=True))
