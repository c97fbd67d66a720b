"""The form a pruned checkpoint is saved in, so that the engines people serve with run it as transformers
does. After a residual slice hidden_size < heads * head_dim; transformers reads head_dim from the config,
but some engines' model code derives it, or a scale, from hidden_size (docs/SERVING.md has the fields
each engine reads, per architecture). An adapter names the rewrite its architecture needs; each one is
exact (same logits in transformers, tested) and is recorded in dietprune.json as "saved_as".

A rewrite takes the pruned config and returns (the config saved, a transform of each tensor as it is
written, a note), or None when the checkpoint is served correctly as it is. The transform takes
(name, tensor) and returns the tensors saved for it, so a model is rewritten one tensor at a time
(models/store.py's writer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from transformers import LlamaConfig

from dietprune.models.edit import head_dim

Rewrite = tuple[object, Callable[[str, torch.Tensor], dict[str, torch.Tensor]], dict]
QWEN2_ONLY = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def qwen2_as_llama(config) -> Rewrite | None:
    """Qwen2 -> Llama with attention biases. llama.cpp's Qwen2 declares attn_q/attn_output as
    {n_embd, n_embd} and vLLM's Qwen2 sets head_dim = hidden_size // heads, so neither loads a Qwen2 whose
    hidden_size is not heads * head_dim. Llama reads head_dim from the config in both, and computes the
    same function: q/k/v with biases (attention_bias), o_proj given a zero bias (Llama ties the o_proj
    bias to the same flag), RMSNorm, SwiGLU, the same rope. Qwen2's sliding-window fields go: Llama never
    slides, and no released Qwen2/2.5 uses the window. LlamaConfig also requires hidden % heads == 0."""
    heads = config.num_attention_heads
    if config.hidden_size == heads * head_dim(config):
        return None
    if getattr(config, "use_sliding_window", False) or config.hidden_size % heads:
        return None  # not expressible as Llama; stays Qwen2 (transformers runs it; the engines do not)
    dropped = (*QWEN2_ONLY, "model_type", "architectures", "transformers_version")
    values = {k: v for k, v in config.to_dict().items() if k not in dropped}
    values |= {"attention_bias": True, "mlp_bias": False, "head_dim": head_dim(config),
               "architectures": ["LlamaForCausalLM"]}
    llama = LlamaConfig.from_dict(values)

    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.o_proj\.weight", name):
            return {name: tensor, name.removesuffix("weight") + "bias": tensor.new_zeros(tensor.shape[0])}
        return {name: tensor}

    note = {"architecture": "LlamaForCausalLM", "from": "Qwen2ForCausalLM",
            "why": "llama.cpp and vLLM derive Qwen2's head_dim from hidden_size; Llama with attention "
                   "biases and a zero o_proj bias computes the same function and reads head_dim"}
    return llama, transform, note


def gemma_attention_scale(config, layers_of_27b: int, q_norm: bool) -> Rewrite | None:
    """Gemma-2/3: transformers and vLLM scale attention by query_pre_attn_scalar^-1/2, but llama.cpp does
    not read that field: it uses s = hidden_size // heads for a model with the 27B's layer count (46 for
    Gemma-2, 62 for Gemma-3) and s = head_dim otherwise. The released models agree with it (qpas = 144 =
    4608 / 32 for Gemma-2 27B, 256 = head_dim for the others); a 27B pruned in width or depth does not.
    Then q is scaled by f = sqrt(s / qpas) and qpas set to s: q.k * f / sqrt(s) = q.k / sqrt(qpas), the
    same logits everywhere. Gemma-3 normalises q per head (q_norm), which would undo a scaled q_proj, so
    its gain (1 + w) becomes (1 + w) * f."""
    if config.num_hidden_layers == layers_of_27b:
        target = config.hidden_size // config.num_attention_heads
    else:
        target = head_dim(config)
    if config.query_pre_attn_scalar == target:
        return None
    factor = math.sqrt(target / config.query_pre_attn_scalar)
    scaled = r"model\.layers\.\d+\.self_attn\." + (r"q_norm\.weight" if q_norm else r"q_proj\.(weight|bias)")

    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not re.fullmatch(scaled, name):
            return {name: tensor}
        if q_norm:
            return {name: (1 + tensor.float()).mul(factor).sub(1).to(tensor.dtype)}
        return {name: tensor.float().mul(factor).to(tensor.dtype)}

    values = config.to_dict() | {"query_pre_attn_scalar": target}
    note = {"query_pre_attn_scalar": [config.query_pre_attn_scalar, target], "q_scale": factor,
            "why": "llama.cpp scales a 27B-shaped Gemma's attention by hidden_size / heads, not by "
                   "query_pre_attn_scalar; folded into q so that every engine computes the same"}
    return config.__class__.from_dict(values), transform, note
