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

from dietprune.assemble import Edit, applied
from dietprune.errors import DietError
from dietprune.models.adapters import Adapter, adapter_for
from dietprune.models.edit import edited_config, embedding_names

CHUNK_BYTES = 1 << 24  # in-place slicing copies at most this much at a time


def _roles(model: PreTrainedModel, k: int, tied: bool | None = None) -> dict[str, tuple[str, float]]:
    """Module name -> (role on the residual axis, scale) for a slice to width k (see the module doc), with
    the head tied to the embedding as in the model unless `tied` says otherwise."""
    adapter = adapter_for(model.config)
    adapter.require("slicing", "norm_with_bias")
    r = math.sqrt(model.config.hidden_size / k)
    c = 1 / r
    embedding_scale = 1.0 if adapter.width_scaled_embedding else c
    head_scale = embedding_scale if _is_tied(model, tied) else 1.0

    roles: dict[str, tuple[str, float]] = {adapter.final_norm: ("norm", r / head_scale)}
    for i in range(len(model.get_submodule(adapter.layers))):
        prefix = f"{adapter.layers}.{i}."
        for block in adapter.sub_blocks:
            roles |= {prefix + n: ("reader", 1.0) for n in block.readers}
            roles |= {prefix + block.writer: ("writer", c), prefix + block.norm: ("norm", r)}
            if block.output_norm:
                roles[prefix + block.output_norm] = ("norm", 1.0)
    embedding, head = embedding_names(model)
    roles[embedding] = ("reader", embedding_scale)
    roles[head] = ("reader", head_scale)
    return roles


def _is_tied(model: PreTrainedModel, tied: bool | None = None) -> bool:
    """Whether the LM head is the embedding's matrix (as in the model unless `tied` says otherwise)."""
    return model.config.tie_word_embeddings if tied is None else tied


def head_scale(model: PreTrainedModel, k: int) -> float:
    """The factor the LM head's kept columns are multiplied by in a slice to width k."""
    return _roles(model, k)[embedding_names(model)[1]][1]


def sliced_param_count(model: PreTrainedModel, k: int, untie: bool = False) -> int:
    """Parameters of `model` sliced to width k (tied weights counted once, or twice with `untie`),
    without slicing it."""
    roles, d = _roles(model, k), model.config.hidden_size
    count = 0
    for name, param in model.named_parameters():  # each shared parameter once
        role = roles.get(name.rpartition(".")[0], (None,))[0]
        on_axis = role in ("writer", "norm") or (role == "reader" and name.endswith(".weight"))
        count += param.numel() // d * k if on_axis else param.numel()
    head = model.get_output_embeddings().weight
    if untie and head is model.get_input_embeddings().weight:
        count += head.numel() // d * k
    return count


def slice_edit(model: PreTrainedModel, keep: torch.Tensor, in_place: bool = False, tied: bool | None = None,
               head_columns: torch.Tensor | None = None) -> Edit:
    """The slice to hidden dims `keep` as an edit (see assemble.py): a config of width len(keep), each
    block's and every other tensor's kept rows or columns, compensated to match the mask. `in_place`
    writes each sliced matrix over the front of the dense one's memory (no second copy of the weights;
    the dense model is unusable afterwards). `tied=False` slices a tied head as its own matrix (after
    SliceGPT's rotation has untied it). `head_columns` (d x K): the LM head's K columns are E T instead
    of E[:, keep] (recovery's linear head refit), and so are the embedding's when they are tied."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    d, k = model.config.hidden_size, len(keep)
    if not 0 < k <= d or len(keep.unique()) != k or keep.max() >= d:
        raise DietError(f"kept dims must be {k} distinct indices below hidden_size {d}")
    if k % model.config.num_attention_heads:
        raise DietError(f"kept width {k} is not a multiple of the {model.config.num_attention_heads} "
                        "attention heads; use --round-to so K is")
    adapter, roles = adapter_for(model.config), _roles(model, k, tied)
    embedding, head = embedding_names(model)
    mapped = set() if head_columns is None else {f"{head}.weight"} | (
        {f"{embedding}.weight"} if _is_tied(model, tied) else set())

    def block(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = f"{adapter.layers}.{index}."
        return {name: _slice_tensor(tensor, *_role(roles, prefix + name), keep, adapter, in_place)
                for name, tensor in state.items()}

    def rest(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in mapped:
            columns = head_columns.to(tensor.device, tensor.dtype)
            return _map_columns(tensor, lambda rows: rows @ columns, k, in_place).mul_(_role(roles, name)[2])
        return _slice_tensor(tensor, *_role(roles, name), keep, adapter, in_place)

    changes = {"hidden_size": k} | ({} if tied is None else {"tie_word_embeddings": tied})
    return Edit(edited_config(model.config, changes), block, rest)


def _role(roles: dict[str, tuple[str, float]], name: str) -> tuple[str | None, str, float]:
    """(role, tensor kind, scale) of the tensor `name` (full name) in a slice."""
    module, _, kind = name.rpartition(".")
    role, scale = roles.get(module, (None, 1.0))
    return role, kind, scale


def _slice_tensor(tensor: torch.Tensor, role: str | None, kind: str, scale: float,
                  keep: torch.Tensor, adapter: Adapter, in_place: bool) -> torch.Tensor:
    keep = keep.to(tensor.device)
    if role == "reader" and kind == "weight":
        return _map_columns(tensor, lambda rows: rows[:, keep], len(keep), in_place).mul_(scale)
    if role == "writer":
        return _keep_rows(tensor, keep, in_place).mul_(scale)
    if role == "norm":
        gain = (adapter.norm_offset + tensor[keep].double()) * scale
        return (gain - adapter.norm_offset).to(tensor.dtype)
    return tensor


def _rows_per_chunk(matrix: torch.Tensor) -> int:
    row_bytes = matrix[0].numel() * matrix.element_size() if matrix.dim() > 1 else matrix.element_size()
    return max(1, CHUNK_BYTES // row_bytes)


def _map_columns(matrix: torch.Tensor, columns: Callable[[torch.Tensor], torch.Tensor], k: int,
                 in_place: bool) -> torch.Tensor:
    """columns(matrix): a map of each row's d entries to k (matrix[:, keep], or matrix @ T); in place:
    chunk by chunk over the front of matrix's memory. Writing rows < i never reaches row i's old data,
    since k < d entries per row are written."""
    if not in_place or not matrix.is_contiguous():
        return columns(matrix)
    rows = matrix.shape[0]
    flat = matrix.view(-1)
    step = _rows_per_chunk(matrix)
    for start in range(0, rows, step):
        block = columns(matrix[start:start + step])  # a new tensor, from rows that are still intact
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


def slice_model(model: PreTrainedModel, keep: torch.Tensor, in_place: bool = False) -> PreTrainedModel:
    """A new model of width len(keep) that computes what `masked(model, keep)` computes, in memory.
    `in_place` reuses the dense weights' memory (peak memory stays near one model; `model` is
    destroyed)."""
    return applied(model, slice_edit(model, keep, in_place), "slice")


def rms_normalised(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's input normalised without its gain: x / sqrt(mean(x^2) + eps)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
