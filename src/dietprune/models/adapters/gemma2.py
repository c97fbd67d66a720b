"""Gemma-2: four norms per layer (two read the residual, two normalise the writers' outputs), (1 + w)
gains, embeddings scaled by sqrt(hidden_size) and tied to the LM head."""

from functools import partial

from dietprune.models.adapters.base import Adapter
from dietprune.models.serving import gemma_attention_scale

ADAPTER = Adapter(
    name="gemma2",
    model_types=("gemma2",),
    mlp_norm="pre_feedforward_layernorm",
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    width_scaled_embedding=True,
    serving=partial(gemma_attention_scale, layers_of_27b=46, q_norm=False),
)
