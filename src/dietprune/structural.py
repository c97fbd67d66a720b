"""Structured baselines that prune other structures than hidden dims, to a given parameter count.

shortgpt  whole decoder layers, lowest Block Influence first (ShortGPT, Men et al. 2024)
wanda_sp  query heads and MLP channels, lowest activation-weighted magnitude first (Wanda-SP / FLAP)

Both build a fresh model from an edited config and load the cut state dict strictly: layers are
numbered 0..n-1, every layer has the same shapes and head_dim stays explicit, so stock transformers
loads the saved checkpoint. Tensors that are not cut are shared with the input model.

Parameter target: the count is the nearest the rule can reach, above or below the target (ties go to
the larger model). ShortGPT misses by at most half a layer, Wanda-SP by at most half an MLP channel
over all layers (see `wanda_sp` for how the budget is split between heads and channels). A target
the rule cannot get within half a unit of (below one layer, one head group and one channel) raises.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dietprune.errors import DietError
from dietprune.models.adapters import adapter_for
from dietprune.profile import calibration_batches
from dietprune.progress import progress


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def block_influence(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 8,
                    max_length: int = 1024) -> torch.Tensor:
    """(layers,) float64: 1 - mean cos(h_in, h_out) of each decoder layer over non-padding tokens."""
    layers = model.get_submodule(adapter_for(model.config).layers)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def before(i: int, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs[i] = args[0] if args else kwargs["hidden_states"]

    def after(i: int, _module: nn.Module, _args: tuple, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        cos = F.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
        cos_sum[i] += (cos * mask[0]).sum().double()

    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(partial(before, i), with_kwargs=True),
        layer.register_forward_hook(partial(after, i)))]
    try:
        tokens = _calibrate(model, tokenizer, texts, batch_size, max_length, mask, "block influence")
    finally:
        for handle in handles:
            handle.remove()
    return 1 - cos_sum / tokens


def shortgpt(model, tokenizer, texts: list[str], target_params: int, batch_size: int = 8,
             max_length: int = 1024) -> tuple[PreTrainedModel, dict]:
    """ShortGPT (Men et al. 2024): drop whole decoder layers with the lowest Block Influence.

    The number of layers removed is the one whose parameter count is nearest to `target_params` (ties:
    fewer removed); among equal influences the lower layer index goes first."""
    adapter = adapter_for(model.config)
    layers = model.get_submodule(adapter.layers)
    total, per_layer = count_params(model), count_params(layers[0])
    n = _nearest_units(total - target_params, per_layer)
    if n >= len(layers):
        raise DietError(f"target {target_params} parameters needs removing {n} of {len(layers)} layers; "
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
    pruned = _rebuild(model, _edited_config(model.config, changes), state)
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


@torch.inference_mode()
def wanda_sp_scores(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 8,
                    max_length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, query heads) and (layers, MLP channels) float64 importances.

    Channel j: ||x_j||_2 over calibration tokens (down_proj's input) x sum_i |W_down[i, j]|; query
    head: the same product summed over the head's o_proj input columns."""
    adapter = adapter_for(model.config)
    o_name, down_name = adapter.writers
    layers = model.get_submodule(adapter.layers)
    writers = [(layer.get_submodule(o_name), layer.get_submodule(down_name)) for layer in layers]
    sq_sums = [[torch.zeros(m.in_features, dtype=torch.float64) for m in pair] for pair in writers]
    mask: list[torch.Tensor] = []

    def accumulate(total: torch.Tensor, _module: nn.Module, args: tuple) -> None:
        total += (args[0].float().square() * mask[0].unsqueeze(-1)).sum((0, 1)).double()

    handles = [module.register_forward_pre_hook(partial(accumulate, total))
               for pair, totals in zip(writers, sq_sums, strict=True)
               for module, total in zip(pair, totals, strict=True)]
    try:
        _calibrate(model, tokenizer, texts, batch_size, max_length, mask, "wanda-sp")
    finally:
        for handle in handles:
            handle.remove()
    heads = model.config.num_attention_heads
    head_scores, channel_scores = [], []
    for (o_proj, down_proj), (o_sq, down_sq) in zip(writers, sq_sums, strict=True):
        o_score = o_sq.sqrt() * o_proj.weight.abs().sum(0).double()
        head_scores.append(o_score.view(heads, -1).sum(1))
        channel_scores.append(down_sq.sqrt() * down_proj.weight.abs().sum(0).double())
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
    config = model.config
    q_name, k_name, v_name, gate_name, up_name = adapter.readers
    o_name, down_name = adapter.writers
    layers = model.get_submodule(adapter.layers)
    first = layers[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = _head_dim(config)
    intermediate = first.get_submodule(down_name).in_features
    whole_heads = kv_heads == heads  # no grouping: q, k and v heads go together
    step = 1 if whole_heads else kv_heads  # query heads removed per layer come in steps of this
    cut_rows = [q_name, k_name, v_name] if whole_heads else [q_name]
    head_cost = len(layers) * head_dim * (
        sum(_row_params(first.get_submodule(n)) for n in cut_rows) + first.get_submodule(o_name).out_features)
    channel_cost = len(layers) * (_row_params(first.get_submodule(gate_name))
                                  + _row_params(first.get_submodule(up_name))
                                  + first.get_submodule(down_name).out_features)

    total = count_params(model)
    budget = total - target_params
    fraction = max(budget, 0) / (heads * head_cost + intermediate * channel_cost)
    allowed = [0] + [r for r in range(step, heads, step) if r * head_cost <= budget
                     and _accepts(config, _head_changes(config, heads - r, whole_heads, head_dim))]
    head_cut = min(allowed, key=lambda r: (abs(r - fraction * heads), r))
    channel_cut = _nearest_units(budget - head_cut * head_cost, channel_cost)
    if channel_cut >= intermediate:
        raise DietError(f"target {target_params} parameters needs removing {channel_cut} of {intermediate} "
                        f"MLP channels after {head_cut} of {heads} heads per layer; at least one must stay")

    head_scores, channel_scores = wanda_sp_scores(model, tokenizer, texts, batch_size, max_length)
    groups = 1 if whole_heads else kv_heads
    kept_heads = [_top(s.view(groups, -1), (heads - head_cut) // groups) for s in head_scores]
    kept_channels = [_top(s.view(1, -1), intermediate - channel_cut) for s in channel_scores]

    state = model.state_dict()
    for i, (h, c) in enumerate(zip(kept_heads, kept_channels, strict=True)):
        prefix = f"{adapter.layers}.{i}."
        head_rows = (torch.tensor(h)[:, None] * head_dim + torch.arange(head_dim)).flatten()
        cuts = [(n, 0, head_rows) for n in cut_rows] + [(o_name, 1, head_rows)]
        channels = torch.tensor(c)
        cuts += [(gate_name, 0, channels), (up_name, 0, channels), (down_name, 1, channels)]
        for name, axis, index in cuts:
            for kind in ("weight", "bias") if axis == 0 else ("weight",):  # a bias lies on the row axis
                key = f"{prefix}{name}.{kind}"
                if key in state:
                    state[key] = state[key].index_select(axis, index)
    changes = _head_changes(config, heads - head_cut, whole_heads, head_dim)
    changes["intermediate_size"] = intermediate - channel_cut
    pruned = _rebuild(model, _edited_config(config, changes), state)
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


def _calibrate(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int, max_length: int,
               mask: list[torch.Tensor], desc: str) -> int:
    """Run `texts` through the decoder; `mask[0]` holds the running batch's (batch, seq) token mask.
    Returns the number of non-padding tokens."""
    tokens = 0
    for batch in progress(calibration_batches(tokenizer, texts, batch_size, max_length), desc=desc,
                          unit="batch"):
        mask[:] = [batch["attention_mask"].float()]
        model.get_decoder()(**batch)
        tokens += int(batch["attention_mask"].sum())
    if not tokens:
        raise DietError("no calibration tokens; give at least one non-empty text")
    return tokens


def _nearest_units(excess: int, unit: int) -> int:
    """The count n >= 0 for which n * unit is nearest to `excess` (ties: the smaller n)."""
    return max(0, (2 * excess + unit - 1) // (2 * unit))


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices (into the flattened rows) of the `keep` highest scores of each row, ascending; among
    equal scores the lower index stays."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    offsets = torch.arange(scores.shape[0])[:, None] * scores.shape[1]
    return sorted((order + offsets).flatten().tolist())


def _row_params(linear: nn.Linear) -> int:
    """Parameters of one output row of a linear layer (its bias included)."""
    return linear.in_features + (linear.bias is not None)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _head_changes(config, heads: int, whole_heads: bool, head_dim: int) -> dict:
    """Config fields for `heads` query heads; head_dim is written out so it survives the change."""
    kv_heads = heads if whole_heads else config.num_key_value_heads
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}


def _accepts(config, changes: dict) -> bool:
    """Whether the config class validates with `changes` (some require hidden_size % heads == 0)."""
    try:
        _edited_config(config, changes)
    except (ValueError, StrictDataclassError):
        return False
    return True


def _edited_config(config, changes: dict):
    """A new config of the same class with `changes` applied (validated like a loaded one)."""
    return config.__class__.from_dict(config.to_dict() | changes)


def _rebuild(model: PreTrainedModel, config, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A stock model built from `config` holding `state` (loaded strictly, no copies)."""
    with init_empty_weights(include_buffers=False):  # parameters on "meta": assigned below, no memory
        pruned = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        pruned.tie_weights()
    return pruned.eval()
