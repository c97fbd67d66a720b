"""shortgpt: whole decoder layers, lowest Block Influence first (ShortGPT, Men et al. 2024).

The pruned model is built from an edited config and the cut state dict, loaded strictly: layers are
numbered 0..n-1 and every layer keeps its shapes, so stock transformers loads the saved checkpoint.
Tensors that are not cut are shared with the input model. The layer count is the one whose parameter
count is nearest the target, so it misses by at most half a layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from dietprune.calibration import ForwardPass, token_batches
from dietprune.errors import NotApplicable
from dietprune.methods.base import Method, nearest_units, require_tokens
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import count_params, edited_config, rebuild


def block_influence(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 8,
                    max_length: int = 1024) -> torch.Tensor:
    """(layers,) float64: 1 - mean cos(h_in, h_out) of each decoder layer over non-padding tokens."""
    layers = model.get_submodule(adapter_for(model.config).layers)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    run = ForwardPass(model)
    for i, layer in enumerate(layers):
        run.on_input(layer, lambda x, i=i: inputs.__setitem__(i, x))

        def after(out: torch.Tensor, i: int = i) -> None:
            cos_sum[i] += F.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1).sum().double().cpu()
        run.on_output(layer, after)
    tokens = require_tokens(run.run(token_batches(tokenizer, texts, batch_size, max_length),
                                    "block influence"))
    return 1 - cos_sum / tokens


def shortgpt(model, tokenizer, texts: list[str], target_params: int, batch_size: int = 8,
             max_length: int = 1024) -> tuple[PreTrainedModel, dict]:
    """Drop the decoder layers with the lowest Block Influence. The number removed is the one whose
    parameter count is nearest to `target_params` (ties: fewer removed); among equal influences the
    lower layer index goes first."""
    adapter = adapter_for(model.config)
    layers = model.get_submodule(adapter.layers)
    total, per_layer = count_params(model), count_params(layers[0])
    n = nearest_units(total - target_params, per_layer)
    if n >= len(layers):
        raise NotApplicable(f"target {target_params} parameters needs removing {n} of {len(layers)} layers; "
                        "at least one layer must stay")
    influence = block_influence(model, tokenizer, texts, batch_size, max_length)
    removed = sorted(torch.argsort(influence, stable=True)[:n].tolist())
    kept = [i for i in range(len(layers)) if i not in removed]

    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(adapter.layers + "."):
            index, _, rest = key[len(adapter.layers) + 1:].partition(".")
            if int(index) not in new_index:
                continue
            key = f"{adapter.layers}.{new_index[int(index)]}.{rest}"
        state[key] = tensor
    changes: dict = {"num_hidden_layers": len(kept)}
    if getattr(model.config, "layer_types", None) is not None:
        changes["layer_types"] = [model.config.layer_types[i] for i in kept]
    pruned = rebuild(edited_config(model.config, changes), state, next(model.parameters()).dtype)
    record = {
        "method": "shortgpt",
        "rule": "remove the layers with the lowest block influence 1 - mean cos(h_in, h_out) over "
                "calibration tokens; layer count nearest to the target (ties: fewer removed)",
        "block_influence": influence.tolist(),
        "removed_layers": removed,
        "kept_layers": kept,
        "layer_params": per_layer,
        "target_params": target_params,
        "params_before": total,
        "params_after": count_params(pruned),
    }
    return pruned, record


METHOD = Method(name="shortgpt", summary="whole decoder layers by Block Influence", build=shortgpt)
