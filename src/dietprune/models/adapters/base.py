"""What an architecture adapter declares: the modules that read from and write to the residual stream.

Names are relative to one decoder layer. A decoder layer here is two sub-blocks, attention and MLP; each
reads the residual stream through its own norm and writes one linear layer's output back into it,
optionally through an output norm (Gemma-2/3). Every other tensor in the model is left untouched;
loading the sliced state dict strictly into a model built from the new config checks that nothing was
missed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dietprune.errors import NotApplicable


@dataclass(frozen=True)
class SubBlock:
    """One sub-block: `norm` normalises the residual stream for `readers`; `module` (the attention or the
    MLP, which holds the readers and the writer) computes from it, its last step `writer`; the result is
    added back to the stream, through `output_norm` when there is one:

        h  <-  h + output_norm(module(norm(h)))

    `attention`: the module also takes the decoder layer's keyword arguments (masks, positions)."""

    norm: str
    module: str
    readers: tuple[str, ...]
    writer: str
    output_norm: str | None = None
    attention: bool = False


@dataclass(frozen=True)
class Adapter:
    """Residual-stream anatomy of one architecture.

    attention: q/k/v read through the first norm, o_proj writes; mlp: gate/up read, down_proj writes;
    the decoder layer computes exactly its two sub-blocks in order (the sequential engine runs them one
    at a time, tested equal to the layer's own forward for every adapter).
    q, k, v, o, gate, up, down name the same modules by role for the algorithms that cut heads and
    channels. norm_offset: the norm multiplies by (norm_offset + weight); Gemma uses 1.
    width_scaled_embedding: embeddings are multiplied by sqrt(hidden_size) (Gemma).
    The flags mark anatomy that some algorithms cannot handle (see `require`): parallel_block
    (attention and MLP read the same norm output and write together), norm_with_bias (LayerNorm: centred
    and biased, so neither a slice nor a rotation of the stream is exact), fused_qkv (one matrix holds
    q, k and v, so heads cannot be cut one projection at a time).
    serving: the exact rewrite (models/serving.py) that lets llama.cpp and vLLM run a pruned checkpoint.
    """

    name: str
    model_types: tuple[str, ...]
    attention_module: str = "self_attn"
    mlp_module: str = "mlp"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    norm_offset: float = 0.0
    width_scaled_embedding: bool = False
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    parallel_block: bool = False
    norm_with_bias: bool = False
    fused_qkv: bool = False
    serving: Callable | None = None

    @property
    def attention(self) -> SubBlock:
        return SubBlock(self.attention_norm, self.attention_module, (self.q, self.k, self.v), self.o,
                        self.attention_output_norm, attention=True)

    @property
    def mlp(self) -> SubBlock:
        return SubBlock(self.mlp_norm, self.mlp_module, (self.gate, self.up), self.down, self.mlp_output_norm)

    @property
    def sub_blocks(self) -> tuple[SubBlock, SubBlock]:
        return self.attention, self.mlp

    @property
    def readers(self) -> tuple[str, ...]:
        """Linear layers fed by a normalised residual stream (their input columns lie on the axis)."""
        return tuple(name for block in self.sub_blocks for name in block.readers)

    @property
    def writers(self) -> tuple[str, ...]:
        """Linear layers whose outputs land on the residual axis (their output rows lie on it)."""
        return tuple(block.writer for block in self.sub_blocks)

    @property
    def input_norms(self) -> tuple[str, ...]:
        """Norms whose input is the residual stream (the final norm is one too)."""
        return tuple(block.norm for block in self.sub_blocks)

    @property
    def output_norms(self) -> tuple[str, ...]:
        """Norms applied to a writer's output before it is added back (Gemma-2/3)."""
        return tuple(block.output_norm for block in self.sub_blocks if block.output_norm)

    def require(self, algorithm: str, *absent: str) -> None:
        """Refuse, with one line naming the algorithm, an architecture flagged with any of `absent`."""
        for flag in absent:
            if getattr(self, flag):
                raise NotApplicable(f"{algorithm} cannot handle {self.name}'s {flag.replace('_', ' ')}; "
                                "this architecture is not supported for it")
