"""What an architecture adapter declares: the modules that touch the residual stream.

Names are relative to one decoder layer. Every other tensor in the model is left untouched; loading
the sliced state dict strictly into a model built from the new config checks that nothing was missed.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Adapter:
    """Residual-stream anatomy of one architecture.

    readers: linear layers fed by the normalised residual stream (their input columns are sliced).
    writers: linear layers whose outputs land on the residual axis (their output rows are sliced).
    input_norms: norms whose input is the residual stream (the final norm is always one).
    output_norms: norms applied to a writer's output before it is added back (Gemma-2/3).
    norm_offset: the norm multiplies by (norm_offset + weight); Gemma uses 1.
    width_scaled_embedding: embeddings are multiplied by sqrt(hidden_size) (Gemma).
    """

    name: str
    model_types: tuple[str, ...]
    input_norms: tuple[str, ...]
    output_norms: tuple[str, ...] = ()
    readers: tuple[str, ...] = ATTENTION_READERS + MLP_READERS
    writers: tuple[str, ...] = WRITERS
    norm_offset: float = 0.0
    width_scaled_embedding: bool = False
    layers: str = "model.layers"
    final_norm: str = "model.norm"
