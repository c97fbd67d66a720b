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
from transformers import PreTrainedModel

from dietprune.calibration import ForwardPass, token_batches
from dietprune.errors import NotApplicable
from dietprune.merge import kept_width_step
from dietprune.methods.base import Method, require_tokens
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import count_params
from dietprune.slice import CHUNK_BYTES, slice_model, sliced_param_count


def residual_covariance(model: PreTrainedModel, tokenizer, texts: list[str], batch_size: int = 8,
                        max_length: int = 1024) -> torch.Tensor:
    """(d, d) float64 on the model's device: sum over non-padding tokens and over every layer's input
    and the final norm's input of x^T x. Accumulated in float64: the eigenvectors of a sum of ~10^5
    rank-one terms whose eigenvalues span many orders need its digits (SliceGPT found fp64 matters)."""
    adapter = adapter_for(model.config)
    d = model.config.hidden_size
    total = torch.zeros(d, d, dtype=torch.float64, device=model.get_input_embeddings().weight.device)

    def accumulate(x: torch.Tensor) -> None:
        x = x.to(total.device, torch.float64)
        total.addmm_(x.T, x)

    run = ForwardPass(model)
    for site in [*model.get_submodule(adapter.layers), model.get_submodule(adapter.final_norm)]:
        run.on_input(site, accumulate)
    require_tokens(run.run(token_batches(tokenizer, texts, batch_size, max_length), "covariance"))
    return total


def check_rotatable(config) -> None:
    """Refuse architectures whose function a rotation of the residual basis would change."""
    adapter = adapter_for(config)
    adapter.require("slicegpt", "norm_with_bias")
    if adapter.output_norms:
        raise NotApplicable(f"slicegpt needs pre-norm blocks; {adapter.name}'s post-norms "
                        f"({', '.join(adapter.output_norms)}) do not commute with a rotation")


@torch.no_grad()
def rotate(model: PreTrainedModel, q: torch.Tensor) -> None:
    """In place: fold the residual norms' gains into their readers and rotate the residual basis by the
    orthogonal (d, d) matrix `q`; the model computes the same function. Unties a tied head."""
    check_rotatable(model.config)
    adapter = adapter_for(model.config)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.clone())
        model.config.tie_word_embeddings = False
        model.config.get_text_config().tie_word_embeddings = False
    q = q.to(embedding.weight.device, torch.float64)

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        gain = adapter.norm_offset + norm.weight.double()
        for reader in readers:
            _rotate_rows(reader.weight, q, gain)
        norm.weight.fill_(1 - adapter.norm_offset)

    for layer in model.get_submodule(adapter.layers):
        for block in adapter.sub_blocks:
            fold(layer.get_submodule(block.norm), [layer.get_submodule(name) for name in block.readers])
            writer = layer.get_submodule(block.writer)
            _rotate_rows(writer.weight.T, q)
            if writer.bias is not None:
                _rotate_rows(writer.bias[None], q)
    fold(model.get_submodule(adapter.final_norm), [head])
    _rotate_rows(embedding.weight, q)


def _rotate_rows(matrix: torch.Tensor, q: torch.Tensor, gain: torch.Tensor | None = None) -> None:
    """matrix <- (matrix * gain) @ q in place, a block of rows at a time in float64 (bounded memory:
    the embedding of a 256k vocabulary would otherwise need a full float64 copy)."""
    step = max(1, CHUNK_BYTES // (8 * matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        block = matrix[start:start + step].to(q.device, torch.float64)
        rotated = (block if gain is None else block * gain.to(q.device)) @ q
        matrix[start:start + step] = rotated.to(matrix.device)


def slicegpt(model: PreTrainedModel, tokenizer, texts: list[str], target_params: int, batch_size: int = 8,
             max_length: int = 1024) -> tuple[PreTrainedModel, dict]:
    """Rotate onto the calibration texts' principal axes and keep the widest K (a multiple of the head
    count) whose parameter count is at most `target_params`. Returns the sliced model and a record."""
    check_rotatable(model.config)
    covariance = residual_covariance(model, tokenizer, texts, batch_size, max_length)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # float64, where the covariance lies
    order = eigenvalues.argsort(descending=True)
    untied = model.config.tie_word_embeddings
    rotate(model, eigenvectors[:, order])
    step = kept_width_step(model.config, 1)
    k = next((k for k in range(model.config.hidden_size - step, 0, -step)
              if sliced_param_count(model, k) <= target_params), None)
    if k is None:
        raise NotApplicable(f"slicegpt cannot reach {target_params:,} parameters: even the narrowest width "
                        f"({step}, one per head) has more")
    explained = float(eigenvalues[order[:k]].sum() / eigenvalues.sum())
    sliced = slice_model(model, torch.arange(k), in_place=True)
    record = {"method": "slicegpt",
              "rule": "one rotation onto the eigenvectors of the residual covariance (all layer inputs and "
                      "the final norm's input), norm gains folded into readers, then the widest K at most "
                      "the target parameters",
              "hidden_size": k, "untied_head": untied, "explained_variance": explained,
              "target_params": target_params, "params_after": count_params(sliced)}
    return sliced, record


METHOD = Method(name="slicegpt", summary="hidden dims after rotating the residual stream onto its principal "
                "axes (pre-norm architectures only)", build=slicegpt, consumes=True)
