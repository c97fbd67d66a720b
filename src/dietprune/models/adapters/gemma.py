"""Gemma (1): Llama's anatomy with (1 + w) norm gains and sqrt(hidden_size)-scaled, tied embeddings."""

from dietprune.models.adapters.base import Adapter

ADAPTER = Adapter(name="gemma", model_types=("gemma",), norm_offset=1.0, width_scaled_embedding=True)
