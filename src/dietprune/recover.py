"""Training-free recovery: refit the kept input columns of every residual reader in closed form.

After slicing, a reader W (out x d) sees the pruned model's normalised residual n' (K dims) instead of
the dense model's n (d dims). Block by block, on calibration tokens, we fit

    W' = argmin ||W' n' - W n||^2 + lam ||W' - W_K||^2  =  (W C_nn' + lam W_K) (C_n'n' + lam I)^-1

where C_nn' = sum n n'^T, C_n'n' = sum n' n'^T and W_K = W[:, kept] is the plain sliced weight. Ridge
towards W_K (not towards 0) means nothing changes when nothing is pruned, and directions the
calibration data does not excite keep their sliced values. lam = alpha * trace(C_n'n') / K
(alpha = 0.01 by default, GPTQ's dampening). One K x K solve per norm site (q/k/v share one, gate/up
the other). Blocks are processed in order and the pruned model's inputs are those of the blocks already
repaired (sequential, as in SparseGPT-style one-shot methods). Memory holds the hidden states of the
calibration tokens (tokens x (d + K) floats) and the d x K statistics, never per-token activations
of a whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from dietprune.calibration import ForwardPass, StopForward, token_batches
from dietprune.device import execution_device, onloaded
from dietprune.models.adapters import adapter_for
from dietprune.progress import progress


def _layer_inputs(model: nn.Module, batches: list[dict], every_layer: bool = True
                  ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Per batch: the first block's input, and (`every_layer`) every block's keyword arguments (masks,
    positions; they differ between sliding and full attention layers). Without `every_layer` the
    forward pass stops at the first block."""
    layers = model.get_submodule(adapter_for(model.config).layers)
    last = len(layers) - 1 if every_layer else 0
    hidden, kwargs = [], []

    def capture(index: int):
        def fn(args: tuple, kw: dict) -> None:
            if index == 0:
                hidden.append(args[0] if args else kw["hidden_states"])
                kwargs.append([])
            kwargs[-1].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if index == last:
                raise StopForward
        return fn

    run = ForwardPass(model)
    for i, layer in enumerate(layers[:last + 1]):
        run.on_call(layer, capture(i))
    run.run(batches, desc="layer inputs")
    return hidden, kwargs


def _to(value, device: torch.device):
    """Tensors in nested tuples, lists and dicts moved to `device` (layer inputs: hidden states, masks,
    position embeddings)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[list[dict]], index: int,
               hooks: dict[nn.Module, callable] | None = None) -> list[torch.Tensor]:
    """The layer's outputs on each batch, its inputs sent to where the layer computes."""
    device = execution_device(layer)
    handles = [m.register_forward_pre_hook(h) for m, h in (hooks or {}).items()]
    try:
        out = []
        for h, kw in zip(hidden, kwargs, strict=True):
            result = layer(h.to(device), **_to(kw[index], device))
            out.append(result[0] if isinstance(result, tuple) else result)
        return out
    finally:
        for handle in handles:
            handle.remove()


def _capture_inputs(layer: nn.Module, names: list[str], hidden, kwargs, index, masks
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Each named module's input (the normalised residual) on real tokens, and the layer's outputs."""
    seen: dict[str, list] = {name: [] for name in names}

    def hook(name: str):
        def capture(_module, args):
            seen[name].append(args[0])
        return capture

    outputs = _run_layer(layer, hidden, kwargs, index, {layer.get_submodule(n): hook(n) for n in names})
    inputs = {n: torch.cat([x[m.to(x.device).bool()] for x, m in zip(seen[n], masks, strict=True)]).double()
              for n in names}
    return inputs, outputs


@torch.inference_mode()
def recover(dense: nn.Module, pruned: nn.Module, tokenizer, texts: list[str],
            alpha: float = 0.01, batch_size: int = 8, max_length: int = 1024) -> None:
    """Refit `pruned`'s residual readers in place so their outputs match `dense`'s on `texts`.

    Works layer by layer, so the dense model may be dispatched by accelerate with layers offloaded to
    CPU memory or disk: each dense layer is onloaded for its own step. The pruned model's weights must
    be real tensors (it is dispatched after recovery)."""
    adapter = adapter_for(dense.config)
    groups = [block.readers for block in adapter.sub_blocks]  # each group shares one norm's output
    batches = token_batches(tokenizer, texts, batch_size, max_length)
    masks = [b["attention_mask"] for b in batches]
    dense_hidden, kwargs = _layer_inputs(dense, batches)
    pruned_hidden, _ = _layer_inputs(pruned, batches, every_layer=False)
    dense_layers = dense.get_submodule(adapter.layers)
    pruned_layers = pruned.get_submodule(adapter.layers)
    for index in progress(range(len(dense_layers)), desc="recover", unit="block"):
        dense_layer, pruned_layer = dense_layers[index], pruned_layers[index]
        first = [group[0] for group in groups]  # the readers of a group share their input
        targets, dense_hidden = _capture_inputs(dense_layer, first, dense_hidden, kwargs, index, masks)
        for group in groups:
            inputs, _ = _capture_inputs(pruned_layer, group[:1], pruned_hidden, kwargs, index, masks)
            with onloaded(dense_layer):  # the dense weights, onloaded if accelerate offloaded them
                _refit(dense_layer, pruned_layer, group, targets[group[0]], inputs[group[0]], alpha)
        pruned_hidden = _run_layer(pruned_layer, pruned_hidden, kwargs, index)


@torch.no_grad()
def _refit(dense_layer: nn.Module, pruned_layer: nn.Module, names: list[str], n: torch.Tensor,
           n_pruned: torch.Tensor, alpha: float) -> None:
    """Solve for the pruned readers `names` given dense inputs n (T x d) and pruned inputs (T x K), both
    float64: a Gram matrix summed over ~10^4 tokens is too ill-conditioned for float32, let alone the
    bfloat16 a GPU computes in."""
    n_pruned = n_pruned.to(n.device)
    gram = n_pruned.T @ n_pruned  # K x K
    cross = n.T @ n_pruned  # d x K
    lam = alpha * gram.diagonal().mean()
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for name in names:
        weight = dense_layer.get_submodule(name).weight.to(cross.device, torch.float64)
        target = pruned_layer.get_submodule(name).weight
        # out x K; target holds W_K (the plain sliced weight)
        rhs = weight @ cross + lam * target.to(cross.device, torch.float64)
        solved = torch.linalg.solve(system, rhs.T).T  # system is symmetric
        target.copy_(solved.to(target.device, target.dtype))
