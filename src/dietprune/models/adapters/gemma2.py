"""Gemma-2: four norms per layer (two on the residual, two on block outputs), (1 + w) gains,
embeddings scaled by sqrt(hidden_size) and tied to the LM head."""

from dietprune.models.adapters.base import Adapter

ADAPTER = Adapter(
    name="gemma2",
    model_types=("gemma2",),
    input_norms=("input_layernorm", "pre_feedforward_layernorm"),
    output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
    width_scaled_embedding=True,
)
