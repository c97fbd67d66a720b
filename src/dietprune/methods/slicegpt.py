"""slicegpt: rotate the residual stream onto its principal axes, then slice the last ones (SliceGPT-style).

SliceGPT (Ashkboos et al., 2024) folds each RMSNorm's gain into the linear layers that read the norm's
output. The norm then computes x / rms(x), which commutes with any orthogonal Q, so rotating the
residual basis (embedding rows and writer outputs by Q, reader inputs by Q) leaves the model's function
unchanged, and deleting the least-variance principal directions becomes a hidden-dimension slice.
SliceGPT uses one Q per layer plus shortcut matrices, which stock transformers cannot load. Here one Q
serves the whole stream: the eigenvectors of the residual covariance summed over every layer's input
and the final norm's input. The rotated model is then sliced by `slice_model` like any mask, and saves
as a standard checkpoint.

Limits, stated rather than approximated:
* only architectures whose residual norms all read the stream (pre-norm). Gemma-2/3's post-norms scale a
  writer's output per dimension and do not commute with Q, so they are refused;
* a tied head is untied: the final norm's gain folds into the head but not into the embedding. The
  head's kept columns then count towards the parameter budget, so K is smaller than DIET's.
"""

from __future__ import annotations

import torch
from torch import nn

from dietprune.assemble import Edit
from dietprune.calibration import all_sum
from dietprune.errors import NotApplicable
from dietprune.methods.base import Method
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import edited_config, embedding_names
from dietprune.sequential import Observer
from dietprune.slice import CHUNK_BYTES, slice_edit, sliced_param_count


class Covariance(Observer):
    """(d, d) float64: sum over real tokens and over every layer's input and the final norm's input of
    x^T x. Accumulated in float64: the eigenvectors of a sum of ~10^5 rank-one terms whose eigenvalues
    span many orders need its digits (SliceGPT found fp64 matters)."""

    sites = frozenset({"block_input"})

    def __init__(self, model: nn.Module, target_params: int):
        check_rotatable(model.config)
        self.total: torch.Tensor | None = None
        self.width = model.config.hidden_size

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        if self.total is None:
            self.total = torch.zeros(self.width, self.width, dtype=torch.float64, device=x.device)
        x = x.to(self.total.device, torch.float64)
        self.total.addmm_(x.T, x)


def check_rotatable(config) -> None:
    """Refuse architectures whose function a rotation of the residual basis would change."""
    adapter = adapter_for(config)
    adapter.require("slicegpt", "norm_with_bias")
    if adapter.output_norms:
        raise NotApplicable(f"slicegpt needs pre-norm blocks; {adapter.name}'s post-norms "
                            f"({', '.join(adapter.output_norms)}) do not commute with a rotation")


def rotation(model: nn.Module, q: torch.Tensor, in_place: bool = False) -> Edit:
    """Fold the residual norms' gains into their readers and rotate the residual basis by the orthogonal
    (d, d) matrix `q`: the same function, with an untied head (the final norm's gain folds into the head
    but not into the embedding). `in_place` rotates each block's matrices in their own memory; the
    tensors outside the blocks are always new (a tied head still reads the embedding). The final norm
    comes before the head among the tensors outside the blocks (assemble.rest_tensors' order)."""
    check_rotatable(model.config)
    adapter = adapter_for(model.config)
    q = q.to(torch.float64)
    embedding, head = embedding_names(model)
    offset = adapter.norm_offset
    final_gain: list[torch.Tensor] = []

    def block(index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = dict(state)
        for sub in adapter.sub_blocks:
            gain = offset + state[f"{sub.norm}.weight"].double()
            for reader in sub.readers:
                state[f"{reader}.weight"] = _rotate_rows(state[f"{reader}.weight"], q, gain, in_place)
            state[f"{sub.norm}.weight"] = torch.full_like(state[f"{sub.norm}.weight"], 1 - offset)
            state[f"{sub.writer}.weight"] = _rotate_rows(state[f"{sub.writer}.weight"].T, q, None, in_place).T
            if f"{sub.writer}.bias" in state:
                state[f"{sub.writer}.bias"] = _rotate_rows(state[f"{sub.writer}.bias"][None], q, None,
                                                           in_place)[0]
        return state

    def rest(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == f"{embedding}.weight":
            return _rotate_rows(tensor, q)
        if name == f"{adapter.final_norm}.weight":
            final_gain.append(offset + tensor.double())
            return torch.full_like(tensor, 1 - offset)
        if name == f"{head}.weight":
            return _rotate_rows(tensor, q, final_gain[0])
        return tensor

    return Edit(edited_config(model.config, {"tie_word_embeddings": False}), block, rest)


def _rotate_rows(matrix: torch.Tensor, q: torch.Tensor, gain: torch.Tensor | None = None,
                 in_place: bool = False) -> torch.Tensor:
    """(matrix * gain) @ q, a block of rows at a time in float64 (bounded memory: the embedding of a 256k
    vocabulary would otherwise need a full float64 copy); written over `matrix` when `in_place`."""
    out = matrix if in_place else torch.empty_like(matrix)
    step = max(1, CHUNK_BYTES // (8 * matrix.shape[1]))
    q = q.to(matrix.device)
    for start in range(0, matrix.shape[0], step):
        block = matrix[start:start + step].to(torch.float64)
        rotated = (block if gain is None else block * gain.to(block.device)) @ q
        out[start:start + step] = rotated.to(out.dtype)
    return out


def edit(model: nn.Module, observer: Covariance, target_params: int, in_place: bool) -> tuple[Edit, dict]:
    """Rotate onto the calibration texts' principal axes and keep the widest K (a multiple of the head
    count) whose parameter count, with the head untied, is at most `target_params`."""
    eigenvalues, eigenvectors = torch.linalg.eigh(all_sum(observer.total))  # float64, where it lies
    order = eigenvalues.argsort(descending=True)
    tied = bool(model.config.tie_word_embeddings)
    step = model.config.num_attention_heads  # transformers rejects a width the heads do not divide
    k = next((k for k in range(model.config.hidden_size - step, 0, -step)
              if sliced_param_count(model, k, untie=True) <= target_params), None)
    if k is None:
        raise NotApplicable(f"slicegpt cannot reach {target_params:,} parameters: even the narrowest width "
                            f"({step}, one per head) has more")
    rotate = rotation(model, eigenvectors[:, order], in_place)
    sliced = slice_edit(model, torch.arange(k), in_place=True, tied=False)
    explained = float(eigenvalues[order[:k]].sum() / eigenvalues.sum())
    record = {"method": "slicegpt",
              "rule": "one rotation onto the eigenvectors of the residual covariance (all layer inputs and "
                      "the final norm's input), norm gains folded into readers, then the widest K at most "
                      "the target parameters",
              "hidden_size": k, "untied_head": tied, "explained_variance": explained,
              "target_params": target_params}
    return Edit(sliced.config, lambda i, state: sliced.block(i, rotate.block(i, state)),
                lambda name, tensor: sliced.rest(name, rotate.rest(name, tensor))), record


METHOD = Method(name="slicegpt", summary="hidden dims after rotating the residual stream onto its principal "
                "axes (pre-norm architectures only)", observer=Covariance, edit=edit)
