"""Slice: physically remove pruned hidden dimensions and save a standard Hugging Face checkpoint.

With d dims before and K after, let r = sqrt(d / K) and c = 1 / r. RMSNorm averages over the width:
over K kept dims the mean square of c * x equals the masked model's mean square of x over d dims (with
zeros), epsilon included. So the sliced residual stream is kept at c times the masked one:
- embeddings give c times their output: Gemma's sqrt(hidden_size) factor becomes sqrt(K) by itself;
  other architectures' embedding weights are multiplied by c;
- writers (o_proj, down_proj) add c times their output: their rows are multiplied by c;
- a norm reading the residual stream gets input c * x and must output what the masked norm outputs:
  its gain is multiplied by 1 / c = r; an output norm (Gemma-2/3) likewise gets input c * y and must
  output c times the masked value: its gain is kept;
- a tied LM head shares the embedding's factor, which the final norm's gain divides out.
The sliced model then equals the masked one exactly in exact arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from dietprune.device import full_state_dict, is_offloaded
from dietprune.errors import DietError
from dietprune.models.adapters import Adapter, adapter_for
from dietprune.models.edit import edited_config, rebuild

CHUNK_BYTES = 1 << 24  # in-place slicing copies at most this much at a time


def _roles(model: PreTrainedModel, k: int) -> dict[str, tuple[str, float]]:
    """Module name -> (role on the residual axis, scale) for a slice to width k (see the module doc)."""
    adapter = adapter_for(model.config)
    adapter.require("slicing", "norm_with_bias")
    r = math.sqrt(model.config.hidden_size / k)
    c = 1 / r
    embedding_scale = 1.0 if adapter.width_scaled_embedding else c
    head_scale = embedding_scale if model.config.tie_word_embeddings else 1.0

    roles: dict[str, tuple[str, float]] = {adapter.final_norm: ("norm", r / head_scale)}
    for i in range(len(model.get_submodule(adapter.layers))):
        prefix = f"{adapter.layers}.{i}."
        for block in adapter.sub_blocks:
            roles |= {prefix + n: ("reader", 1.0) for n in block.readers}
            roles |= {prefix + block.writer: ("writer", c), prefix + block.norm: ("norm", r)}
            if block.output_norm:
                roles[prefix + block.output_norm] = ("norm", 1.0)
    module_names = {module: name for name, module in model.named_modules()}
    roles[module_names[model.get_input_embeddings()]] = ("reader", embedding_scale)
    roles[module_names[model.get_output_embeddings()]] = ("reader", head_scale)
    return roles


def head_scale(model: PreTrainedModel, k: int) -> float:
    """The factor the LM head's kept columns are multiplied by in a slice to width k."""
    module_names = {module: name for name, module in model.named_modules()}
    return _roles(model, k)[module_names[model.get_output_embeddings()]][1]


def sliced_param_count(model: PreTrainedModel, k: int) -> int:
    """Parameters of `model` sliced to width k (tied weights counted once), without slicing it."""
    roles, d = _roles(model, k), model.config.hidden_size
    count = 0
    for name, param in model.named_parameters():  # each shared parameter once
        role = roles.get(name.rpartition(".")[0], (None,))[0]
        on_axis = role in ("writer", "norm") or (role == "reader" and name.endswith(".weight"))
        count += param.numel() // d * k if on_axis else param.numel()
    return count


def sliced_state_dict(model: PreTrainedModel, keep: torch.Tensor, in_place: bool = False
                      ) -> dict[str, torch.Tensor]:
    """The state dict of `model` with only hidden dimensions `keep` (ascending), compensated to match the
    mask. `in_place` writes each sliced matrix over the front of the dense one's memory (no second copy
    of the weights; `model` is unusable afterwards). Weights accelerate offloaded are read into CPU
    memory first (see `full_state_dict`)."""
    return _sliced(full_state_dict(model), "", _roles(model, len(keep)), keep, adapter_for(model.config),
                   in_place)


def _sliced(state: dict[str, torch.Tensor], prefix: str, roles: dict[str, tuple[str, float]],
            keep: torch.Tensor, adapter: Adapter, in_place: bool) -> dict[str, torch.Tensor]:
    """`state` (names relative to the module `prefix`) sliced by the roles of the whole model's modules."""
    sliced, done = {}, {}
    for name, tensor in state.items():
        module, _, kind = (prefix + name).rpartition(".")
        role, scale = roles.get(module, (None, 1.0))
        key = (tensor.data_ptr(), tensor.shape, role, kind, scale)  # tied weights are sliced once
        if key not in done:
            done[key] = _slice_tensor(tensor, role, kind, scale, keep, adapter, in_place)
        sliced[name] = done[key]
    return sliced


def _slice_tensor(tensor: torch.Tensor, role: str | None, kind: str, scale: float,
                  keep: torch.Tensor, adapter: Adapter, in_place: bool) -> torch.Tensor:
    keep = keep.to(tensor.device)
    if role == "reader" and kind == "weight":
        return _keep_columns(tensor, keep, in_place).mul_(scale)
    if role == "writer":
        return _keep_rows(tensor, keep, in_place).mul_(scale)
    if role == "norm":
        gain = (adapter.norm_offset + tensor[keep].double()) * scale
        return (gain - adapter.norm_offset).to(tensor.dtype)
    return tensor


def _rows_per_chunk(matrix: torch.Tensor) -> int:
    row_bytes = matrix[0].numel() * matrix.element_size() if matrix.dim() > 1 else matrix.element_size()
    return max(1, CHUNK_BYTES // row_bytes)


def _keep_columns(matrix: torch.Tensor, keep: torch.Tensor, in_place: bool) -> torch.Tensor:
    """matrix[:, keep]; in place: chunk by chunk over the front of matrix's memory. Writing rows < i
    never reaches row i's old data, since K < d columns per row are written."""
    if not in_place or not matrix.is_contiguous():
        return matrix[:, keep]
    rows, k = matrix.shape[0], len(keep)
    flat = matrix.view(-1)
    step = _rows_per_chunk(matrix)
    for start in range(0, rows, step):
        block = matrix[start:start + step, keep]  # a copy of rows that are still intact
        flat[start * k:start * k + block.numel()] = block.reshape(-1)
    return flat[:rows * k].view(rows, k)


def _keep_rows(matrix: torch.Tensor, keep: torch.Tensor, in_place: bool) -> torch.Tensor:
    """matrix[keep]; in place: rows move to the front, chunk by chunk (keep[j] >= j, so a row is
    read before anything overwrites it)."""
    if not in_place or not matrix.is_contiguous():
        return matrix[keep]
    step = _rows_per_chunk(matrix)
    for start in range(0, len(keep), step):
        rows = keep[start:start + step]
        matrix[start:start + len(rows)] = matrix[rows]
    return matrix[:len(keep)]


def slice_model(model: PreTrainedModel, keep: torch.Tensor, in_place: bool = False,
                on_block: Callable[[PreTrainedModel, int, nn.Module], None] | None = None) -> PreTrainedModel:
    """A new model of width len(keep) that computes what `masked(model, keep)` computes.

    `in_place` reuses the dense weights' memory (peak memory stays near one model; `model` is destroyed).
    `on_block(sliced, i, dense_block)`, if given, runs after block i is sliced, while the dense block i
    is still intact; the model's other tensors are sliced before block 0 (recovery refits block by
    block). In place, each block is then sliced as a copy and, after its call, moved into the front of
    the dense block's memory: memory holds one model plus one block (also when the dense weights are
    memory-mapped from their file, where freeing a block would return nothing)."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    d, k = model.config.hidden_size, len(keep)
    if not 0 < k <= d or len(keep.unique()) != k or keep.max() >= d:
        raise DietError(f"kept dims must be {k} distinct indices below hidden_size {d}")
    if k % model.config.num_attention_heads:
        raise DietError(f"kept width {k} is not a multiple of the {model.config.num_attention_heads} "
                        "attention heads; use --round-to so K is")
    config, dtype = edited_config(model.config, {"hidden_size": k}), next(model.parameters()).dtype
    if on_block is None:
        return rebuild(config, sliced_state_dict(model, keep, in_place), dtype)
    adapter, roles = adapter_for(model.config), _roles(model, k)
    blocks = model.get_submodule(adapter.layers)
    prefix = adapter.layers + "."
    rest = _sliced(full_state_dict(model, without=prefix), "", roles, keep, adapter, in_place)
    sliced = rebuild(config, rest, dtype, partial=prefix)
    for i, (block, sliced_block) in enumerate(zip(blocks, sliced.get_submodule(adapter.layers), strict=True)):
        dense = full_state_dict(block)
        sliced_block.load_state_dict(_sliced(dense, f"{prefix}{i}.", roles, keep, adapter, in_place=False),
                                     strict=True, assign=True)
        on_block(sliced, i, block)
        if in_place and not is_offloaded(block):  # the block moves to the front of the dense one's memory
            sliced_block.load_state_dict({name: _into(dense[name], t) for name, t in
                                          sliced_block.state_dict().items()}, strict=True, assign=True)
    return sliced


def _into(memory: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` written over the front of `memory` (a larger tensor of the same dtype), as a view of it;
    `values` itself where `memory` is not one contiguous block."""
    if not memory.is_contiguous() or memory.dtype != values.dtype or memory.numel() < values.numel():
        return values
    front = memory.view(-1)[:values.numel()].view(values.shape)
    return front.copy_(values)
