"""wanda-sp: query heads and MLP channels, lowest activation-weighted magnitude first (Wanda-SP / FLAP).

The pruned model is built from an edited config and the cut state dict, loaded strictly: every layer
keeps the same shapes and head_dim stays explicit, so stock transformers loads the saved checkpoint.
Tensors that are not cut are shared with the input model. The count misses the target by at most half
an MLP channel over all layers (see `wanda_sp` for how the budget is split between heads and channels);
a target the rule cannot get within half a unit of (below one head group and one channel) raises."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from dietprune.calibration import ForwardPass, token_batches
from dietprune.errors import NotApplicable
from dietprune.methods.base import Method, nearest_units, require_tokens
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import accepts, count_params, edited_config, head_dim, rebuild


def wanda_sp_scores(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 8,
                    max_length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, query heads) and (layers, MLP channels) float64 importances.

    Channel j: ||x_j||_2 over calibration tokens (down_proj's input) x sum_i |W_down[i, j]|; query
    head: the same product summed over the head's o_proj input columns."""
    adapter = adapter_for(model.config)
    layers = model.get_submodule(adapter.layers)
    writers = [(layer.get_submodule(adapter.o), layer.get_submodule(adapter.down)) for layer in layers]
    sq_sums = [[torch.zeros(m.in_features, dtype=torch.float64) for m in pair] for pair in writers]
    run = ForwardPass(model)
    for pair, totals in zip(writers, sq_sums, strict=True):
        for module, total in zip(pair, totals, strict=True):
            run.on_input(module, lambda x, total=total: total.add_(x.float().square().sum(0).double().cpu()))
    require_tokens(run.run(token_batches(tokenizer, texts, batch_size, max_length), "wanda-sp"))
    heads = model.config.num_attention_heads
    head_scores, channel_scores = [], []
    for (o_proj, down_proj), (o_sq, down_sq) in zip(writers, sq_sums, strict=True):
        o_score = o_sq.sqrt() * o_proj.weight.abs().sum(0).double().cpu()
        head_scores.append(o_score.view(heads, -1).sum(1))
        channel_scores.append(down_sq.sqrt() * down_proj.weight.abs().sum(0).double().cpu())
    return torch.stack(head_scores), torch.stack(channel_scores)


def wanda_sp(model, tokenizer, texts: list[str], target_params: int, batch_size: int = 8,
             max_length: int = 1024) -> tuple[PreTrainedModel, dict]:
    """Wanda-SP / FLAP-style: remove attention heads and MLP channels by activation-weighted importance.

    Every layer loses the same number of query heads and of channels (stock configs need uniform
    shapes); each layer picks its own least important ones (ties: the higher index goes). With grouped
    KV heads the KV heads stay and each group loses the same number of query heads; with as many KV
    as query heads whole q/k/v heads go. Head counts the config class rejects are skipped.

    Budget split: let f = (params - target) / (params of all query heads and MLP channels). Remove the
    allowed number of query heads nearest to f x heads (ties: fewer; never more than the budget), then
    the number of channels whose total is nearest to the target (ties: fewer)."""
    adapter = adapter_for(model.config)
    adapter.require("wanda-sp", "fused_qkv")
    config = model.config
    q_name, k_name, v_name, o_name = adapter.q, adapter.k, adapter.v, adapter.o
    gate_name, up_name, down_name = adapter.gate, adapter.up, adapter.down
    layers = model.get_submodule(adapter.layers)
    first = layers[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = head_dim(config)
    intermediate = first.get_submodule(down_name).in_features
    whole_heads = kv_heads == heads  # no grouping: q, k and v heads go together
    step = 1 if whole_heads else kv_heads  # query heads removed per layer come in steps of this
    cut_rows = [q_name, k_name, v_name] if whole_heads else [q_name]
    head_cost = len(layers) * dim * (
        sum(_row_params(first.get_submodule(n)) for n in cut_rows) + first.get_submodule(o_name).out_features)
    channel_cost = len(layers) * (_row_params(first.get_submodule(gate_name))
                                  + _row_params(first.get_submodule(up_name))
                                  + first.get_submodule(down_name).out_features)

    total = count_params(model)
    budget = total - target_params
    fraction = max(budget, 0) / (heads * head_cost + intermediate * channel_cost)
    allowed = [0] + [r for r in range(step, heads, step) if r * head_cost <= budget
                     and accepts(config, _head_changes(config, heads - r, whole_heads))]
    head_cut = min(allowed, key=lambda r: (abs(r - fraction * heads), r))
    channel_cut = nearest_units(budget - head_cut * head_cost, channel_cost)
    if channel_cut >= intermediate:
        raise NotApplicable(f"target {target_params} parameters needs removing {channel_cut} of "
                            f"{intermediate} MLP channels after {head_cut} of {heads} heads per layer; "
                            "at least one must stay")

    head_scores, channel_scores = wanda_sp_scores(model, tokenizer, texts, batch_size, max_length)
    groups = 1 if whole_heads else kv_heads
    kept_heads = [_top(s.view(groups, -1), (heads - head_cut) // groups) for s in head_scores]
    kept_channels = [_top(s.view(1, -1), intermediate - channel_cut) for s in channel_scores]

    state = model.state_dict()
    for i, (h, c) in enumerate(zip(kept_heads, kept_channels, strict=True)):
        prefix = f"{adapter.layers}.{i}."
        head_rows = (torch.tensor(h)[:, None] * dim + torch.arange(dim)).flatten()
        cuts = [(n, 0, head_rows) for n in cut_rows] + [(o_name, 1, head_rows)]
        channels = torch.tensor(c)
        cuts += [(gate_name, 0, channels), (up_name, 0, channels), (down_name, 1, channels)]
        for name, axis, index in cuts:
            for kind in ("weight", "bias") if axis == 0 else ("weight",):  # a bias lies on the row axis
                key = f"{prefix}{name}.{kind}"
                if key in state:
                    state[key] = state[key].index_select(axis, index.to(state[key].device))
    changes = _head_changes(config, heads - head_cut, whole_heads)
    changes["intermediate_size"] = intermediate - channel_cut
    pruned = rebuild(edited_config(config, changes), state, next(model.parameters()).dtype)
    record = {
        "method": "wanda_sp",
        "rule": "importance: ||x||_2 of o_proj/down_proj input columns x column sums of |W|; same counts "
                "in every layer, query heads removed evenly per KV group (whole q/k/v heads without GQA); "
                "heads: allowed count nearest to the fraction f of head and channel params the target "
                "removes, then channels: count nearest to the target (ties: fewer removed)",
        "heads_before": heads,
        "heads_after": heads - head_cut,
        "kv_heads_after": changes["num_key_value_heads"],
        "intermediate_before": intermediate,
        "intermediate_after": intermediate - channel_cut,
        "kept_heads": kept_heads,
        "kept_channels": kept_channels,
        "head_params": head_cost,
        "channel_params": channel_cost,
        "target_params": target_params,
        "params_before": total,
        "params_after": count_params(pruned),
    }
    return pruned, record


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
                build=wanda_sp)
