"""shortgpt: whole decoder layers, lowest Block Influence first (ShortGPT, Men et al. 2024).

The pruned model's config has fewer layers, numbered 0..n-1, each keeping its shapes, so stock
transformers loads the saved checkpoint; tensors that are not cut are passed on unchanged. The layer
count is the one whose parameter count is nearest the target, so it misses by at most half a layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dietprune.assemble import Edit
from dietprune.calibration import all_sum
from dietprune.errors import NotApplicable
from dietprune.methods.base import Method, nearest_units
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import count_params, edited_config
from dietprune.sequential import Observer


class BlockInfluence(Observer):
    """Per decoder layer, the sum over real tokens of cos(h_in, h_out); `result`: 1 - its mean. How many
    layers go is decided first: the number whose parameter count is nearest to the target (ties: fewer
    removed)."""

    sites = frozenset({"block_input", "block_output"})

    def __init__(self, model: nn.Module, target_params: int):
        layers = model.get_submodule(adapter_for(model.config).layers)
        self.total, self.per_layer = count_params(model), count_params(layers[0])
        self.removing = nearest_units(self.total - target_params, self.per_layer)
        if self.removing >= len(layers):
            raise NotApplicable(f"target {target_params} parameters needs removing {self.removing} of "
                                f"{len(layers)} layers; at least one layer must stay")
        self.cos_sum: list[torch.Tensor] = [torch.zeros((), dtype=torch.float64) for _ in layers]
        self.tokens = 0
        self._input: torch.Tensor | None = None

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        if site == "block_input":
            self._input = x
            return
        cos = F.cosine_similarity(self._input.float(), x.float(), dim=-1).sum().double()
        self.cos_sum[index] = self.cos_sum[index].to(cos.device) + cos  # stays on the device: no sync
        self.tokens += len(x) if index == 0 else 0

    def result(self) -> torch.Tensor:
        sums = torch.stack([c.cpu() for c in self.cos_sum] + [torch.tensor(float(self.tokens))])
        sums = all_sum(sums.to(self.cos_sum[-1].device)).cpu()  # data parallel: every shard's tokens
        return 1 - sums[:-1] / sums[-1]


def edit(model: nn.Module, observer: BlockInfluence, target_params: int, in_place: bool) -> tuple[Edit, dict]:
    """Drop the decoder layers with the lowest Block Influence (among equal influences the lower layer
    index goes first)."""
    influence = observer.result()
    removed = sorted(torch.argsort(influence, stable=True)[:observer.removing].tolist())
    kept = [i for i in range(len(influence)) if i not in removed]
    changes: dict = {"num_hidden_layers": len(kept)}
    if getattr(model.config, "layer_types", None) is not None:
        changes["layer_types"] = [model.config.layer_types[i] for i in kept]
    config = edited_config(model.config, changes)
    record = {
        "method": "shortgpt",
        "rule": "remove the layers with the lowest block influence 1 - mean cos(h_in, h_out) over "
                "calibration tokens; layer count nearest to the target (ties: fewer removed)",
        "block_influence": influence.tolist(),
        "removed_layers": removed,
        "kept_layers": kept,
        "layer_params": observer.per_layer,
        "target_params": target_params,
        "params_before": observer.total,
    }
    return Edit(config, lambda i, state: None if i in removed else state, lambda name, tensor: tensor), record


METHOD = Method(name="shortgpt", summary="whole decoder layers by Block Influence", observer=BlockInfluence,
                edit=edit)
