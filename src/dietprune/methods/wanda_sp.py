"""wanda-sp: query heads and MLP channels, lowest activation-weighted magnitude first (Wanda-SP / FLAP).

The pruned model's config has fewer heads and channels, every layer the same shapes, and head_dim stays
explicit, so stock transformers loads the saved checkpoint; tensors that are not cut are passed on. The
count misses the target by at most half an MLP channel over all layers (see `WandaSP` for how the budget
is split between heads and channels); a target the rule cannot get within half a unit of (below one
head group and one channel) is refused before any calibration work."""

from __future__ import annotations

import torch
from torch import nn

from dietprune.assemble import Edit
from dietprune.calibration import all_sum
from dietprune.errors import NotApplicable
from dietprune.methods.base import Method, nearest_units
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import accepts, count_params, edited_config, head_dim
from dietprune.sequential import Observer


class WandaSP(Observer):
    """Wanda-SP / FLAP-style: remove attention heads and MLP channels by activation-weighted importance.

    Importance, per layer: channel j: ||x_j||_2 over calibration tokens (down_proj's input) x
    sum_i |W_down[i, j]|; query head: the same product summed over the head's o_proj input columns.

    Every layer loses the same number of query heads and of channels (stock configs need uniform
    shapes); each layer picks its own least important ones (ties: the higher index goes). With grouped
    KV heads the KV heads stay and each group loses the same number of query heads; with as many KV
    as query heads whole q/k/v heads go. Head counts the config class rejects are skipped.

    Budget split: let f = (params - target) / (params of all query heads and MLP channels). Remove the
    allowed number of query heads nearest to f x heads (ties: fewer; never more than the budget), then
    the number of channels whose total is nearest to the target (ties: fewer)."""

    sites = frozenset({"writer_input"})

    def __init__(self, model: nn.Module, target_params: int):
        adapter = adapter_for(model.config)
        adapter.require("wanda-sp", "fused_qkv")
        config = self.config = model.config
        layers = model.get_submodule(adapter.layers)
        first = layers[0]
        self.heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.writers = (adapter.o, adapter.down)
        self.dim = head_dim(config)
        self.intermediate = first.get_submodule(adapter.down).in_features
        self.whole_heads = kv_heads == self.heads  # no grouping: q, k and v heads go together
        step = 1 if self.whole_heads else kv_heads  # query heads removed per layer come in steps of this
        self.cut_rows = [adapter.q, adapter.k, adapter.v] if self.whole_heads else [adapter.q]
        rows = sum(_row_params(first.get_submodule(n)) for n in self.cut_rows)
        self.head_cost = len(layers) * self.dim * (rows + first.get_submodule(adapter.o).out_features)
        self.channel_cost = len(layers) * (_row_params(first.get_submodule(adapter.gate))
                                           + _row_params(first.get_submodule(adapter.up))
                                           + first.get_submodule(adapter.down).out_features)
        self.total, self.target = count_params(model), target_params
        budget = self.total - target_params
        fraction = max(budget, 0) / (self.heads * self.head_cost + self.intermediate * self.channel_cost)
        allowed = [0] + [r for r in range(step, self.heads, step) if r * self.head_cost <= budget
                         and accepts(config, _head_changes(config, self.heads - r, self.whole_heads))]
        self.head_cut = min(allowed, key=lambda r: (abs(r - fraction * self.heads), r))
        self.channel_cut = nearest_units(budget - self.head_cut * self.head_cost, self.channel_cost)
        if self.channel_cut >= self.intermediate:
            raise NotApplicable(f"target {target_params} parameters needs removing {self.channel_cut} of "
                                f"{self.intermediate} MLP channels after {self.head_cut} of {self.heads} "
                                "heads per layer; at least one must stay")
        self.adapter = adapter
        self.sq_sums: list[torch.Tensor | None] = [None, None]  # this block's o_proj and down_proj inputs
        self.head_scores: list[torch.Tensor] = []
        self.channel_scores: list[torch.Tensor] = []

    def block(self, index: int, layer: nn.Module) -> None:
        self.sq_sums = [None, None]

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        total = x.float().square().sum(0).double()  # on the device: no sync per batch
        self.sq_sums[sub] = total if self.sq_sums[sub] is None else self.sq_sums[sub] + total

    def block_done(self, index: int, layer: nn.Module) -> None:
        o_proj, down_proj = (layer.get_submodule(name) for name in self.writers)
        o_sq, down_sq = (all_sum(total) for total in self.sq_sums)  # data parallel: every shard's tokens
        o_score = o_sq.sqrt() * o_proj.weight.abs().sum(0).double()
        self.head_scores.append(o_score.view(self.heads, -1).sum(1).cpu())
        self.channel_scores.append((down_sq.sqrt() * down_proj.weight.abs().sum(0).double()).cpu())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, query heads) and (layers, MLP channels) float64 importances."""
        return torch.stack(self.head_scores), torch.stack(self.channel_scores)


def edit(model: nn.Module, observer: WandaSP, target_params: int, in_place: bool) -> tuple[Edit, dict]:
    """Cut each layer's least important heads and channels, in the numbers the observer's budget chose."""
    o = observer
    head_scores, channel_scores = o.result()
    groups = 1 if o.whole_heads else o.config.num_key_value_heads
    kept_heads = [_top(s.view(groups, -1), (o.heads - o.head_cut) // groups) for s in head_scores]
    kept_channels = [_top(s.view(1, -1), o.intermediate - o.channel_cut) for s in channel_scores]
    adapter = o.adapter
    cuts = []
    for h, c in zip(kept_heads, kept_channels, strict=True):
        head_rows = (torch.tensor(h)[:, None] * o.dim + torch.arange(o.dim)).flatten()
        channels = torch.tensor(c)
        cuts.append([(n, 0, head_rows) for n in o.cut_rows] + [
            (adapter.o, 1, head_rows), (adapter.gate, 0, channels), (adapter.up, 0, channels),
            (adapter.down, 1, channels)])

    def block(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        for name, axis, rows in cuts[index]:
            for kind in ("weight", "bias") if axis == 0 else ("weight",):  # a bias lies on the row axis
                if (key := f"{name}.{kind}") in state:
                    state[key] = state[key].index_select(axis, rows.to(state[key].device))
        return state

    changes = _head_changes(o.config, o.heads - o.head_cut, o.whole_heads)
    changes["intermediate_size"] = o.intermediate - o.channel_cut
    record = {
        "method": "wanda_sp",
        "rule": "importance: ||x||_2 of o_proj/down_proj input columns x column sums of |W|; same counts "
                "in every layer, query heads removed evenly per KV group (whole q/k/v heads without GQA); "
                "heads: allowed count nearest to the fraction f of head and channel params the target "
                "removes, then channels: count nearest to the target (ties: fewer removed)",
        "heads_before": o.heads,
        "heads_after": o.heads - o.head_cut,
        "kv_heads_after": changes["num_key_value_heads"],
        "intermediate_before": o.intermediate,
        "intermediate_after": o.intermediate - o.channel_cut,
        "kept_heads": kept_heads,
        "kept_channels": kept_channels,
        "head_params": o.head_cost,
        "channel_params": o.channel_cost,
        "target_params": target_params,
        "params_before": o.total,
    }
    return Edit(edited_config(o.config, changes), block, lambda name, tensor: tensor), record


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices (into the flattened rows) of the `keep` highest scores of each row, ascending; among
    equal scores the lower index stays."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    offsets = torch.arange(scores.shape[0])[:, None] * scores.shape[1]
    return sorted((order + offsets).flatten().tolist())


def _row_params(linear: nn.Linear) -> int:
    """Parameters of one output row of a linear layer (its bias included)."""
    return linear.in_features + (linear.bias is not None)


def _head_changes(config, heads: int, whole_heads: bool) -> dict:
    """Config fields for `heads` query heads (and as many KV heads without grouping)."""
    kv_heads = heads if whole_heads else config.num_key_value_heads
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads}


METHOD = Method(name="wanda-sp", summary="attention heads and MLP channels by activation-weighted magnitude",
                observer=WandaSP, edit=edit)
