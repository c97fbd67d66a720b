"""Training-free recovery: refit the sliced model's weights in closed form so that, block by block, what
each module computes on calibration tokens matches what the dense model computes.

After slicing to K kept dims (r = sqrt(d / K), c = 1 / r, the conventions of slice.py: the sliced
residual stream is c times the masked one), every module sees inputs that differ from the dense
model's. Blocks are processed in order, and within a block module by module, each fitted on the
inputs the pruned model gives it after every earlier fit (sequential, as in SparseGPT-style one-shot
methods). All fits keep the checkpoint's shapes: still a stock model of the same size.

readers (q/k/v, gate/up; one K x K system per norm site): W' n' ~ W n, the dense reader's output from
    the dense normalised residual n (d dims) given the pruned one n' (K dims):
        W' = argmin ||W' n' - W n||^2 + lam ||W' - W_K||^2  =  (W C_nn' + lam W_K) (C_n'n' + lam I)^-1
    with C_nn' = sum n n'^T, C_n'n' = sum n' n'^T and W_K = W[:, kept], the plain slice.
writers (o_proj, down_proj rows; one system per writer over its input width): W' z' ~ c (W z)_K, the
    dense writer's output on the kept dims from the dense input z given the pruned input z':
        W' = W'_0 (C_zz' + lam I) (C_z'z' + lam I)^-1,   W'_0 = c W_K (the plain slice).
norms (the output norms of Gemma-2/3, one gain per dim): their input is normalised over K dims
    instead of d, so a kept dim's share of the energy decides its scale (measured on Gemma-3 270M at
    20%: as little as 21% of a writer's output energy stays, making that update 2.2x too large). Each
    gain a_k = offset + w_k is refit by least squares: a_k = (sum_t b_k o_k + lam a0_k) / (sum_t b_k^2 + lam)
    with b' the pruned input normalised without gain and o the dense norm output on dim k, times c.
head (the final norm's gains through the LM head, K parameters): the logits E' (a * b') ~ E n over
    calibration tokens: [(E'^T E') * (sum b' b'^T)] a = rowsum((E'^T E) * (sum n b'^T)^T), which for a
    tied head is all that can change without untying it.
Ridge towards the plain slice (not towards 0): nothing changes when nothing is pruned, and directions
the calibration data does not excite keep their sliced values. lam = alpha x the mean diagonal of the
Gram matrix (alpha = 0.01, GPTQ's dampening). Statistics are float64.

Memory holds the hidden states of the calibration tokens and one block's statistics, never per-token
activations of a whole model, and never two models: blocks are sliced and refit one at a time
(`slice_model(..., on_block=...)`), each refit block then moved into the dense block's memory. The
dense model may be dispatched by accelerate with layers offloaded to CPU memory or disk: each dense
layer is onloaded for its own step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from dietprune.calibration import ForwardPass, StopForward, token_batches
from dietprune.device import execution_device, onloaded
from dietprune.models.adapters import adapter_for
from dietprune.progress import progress
from dietprune.slice import head_scale, slice_model

PARTS = ("readers", "writers", "norms", "head")


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


def _capture(layer: nn.Module, taps: dict[str, str], hidden, kwargs, index, masks
             ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run the layer on every batch; for each tapped module name, its "input" or "output" on real
    tokens (float64, one row per token), and the layer's outputs."""
    device = execution_device(layer)
    seen: dict[str, list] = {name: [] for name in taps}
    handles = []
    for name, what in taps.items():
        module = layer.get_submodule(name)
        if what == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: seen[n].append(out)))
    try:
        outputs = []
        for h, kw in zip(hidden, kwargs, strict=True):
            result = layer(h.to(device), **_to(kw[index], device))
            outputs.append(result[0] if isinstance(result, tuple) else result)
    finally:
        for handle in handles:
            handle.remove()
    rows = {n: torch.cat([x[m.to(x.device).bool()] for x, m in zip(seen[n], masks, strict=True)]).double()
            for n in taps}
    return rows, outputs


@torch.inference_mode()
def recover(dense: PreTrainedModel, tokenizer, texts: list[str], keep: torch.Tensor, alpha: float = 0.01,
            batch_size: int = 8, max_length: int = 1024, parts: tuple[str, ...] = ("readers",),
            in_place: bool = False) -> PreTrainedModel:
    """The slice of `dense` to the dims `keep` with its `parts` refit so that its modules' outputs match
    `dense`'s on `texts` (see the module doc). Blocks are sliced and refit one at a time, so `in_place`
    (`dense` is destroyed) holds one model plus one block, never a second copy."""
    adapter = adapter_for(dense.config)
    keep = torch.as_tensor(keep).sort().values  # the slice's order
    batches = token_batches(tokenizer, texts, batch_size, max_length)
    masks = [b["attention_mask"] for b in batches]
    dense_hidden, kwargs = _layer_inputs(dense, batches)
    head = _HeadTarget(dense, keep) if "head" in parts else None  # needs the dense head: before slicing
    pruned_hidden: list[torch.Tensor] = []
    c = math.sqrt(len(keep) / dense.config.hidden_size)
    bar = progress(total=len(dense.get_submodule(adapter.layers)), desc="recover", unit="block")

    def refit_block(pruned: nn.Module, index: int, dense_layer: nn.Module) -> None:
        nonlocal dense_hidden, pruned_hidden
        if index == 0:
            pruned_hidden = _layer_inputs(pruned, batches, every_layer=False)[0]
        pruned_layer = pruned.get_submodule(adapter.layers)[index]
        taps = {}
        for block in adapter.sub_blocks:
            taps[block.readers[0]] = "input"  # the readers of a block share their input
            taps[block.writer] = "input"
            if block.output_norm:
                taps[block.output_norm] = "output"
        targets, dense_hidden = _capture(dense_layer, taps, dense_hidden, kwargs, index, masks)
        with onloaded(dense_layer):  # the dense weights, onloaded if accelerate offloaded them
            for block in adapter.sub_blocks:
                steps = [("readers", block.readers[0])] + [("writers", block.writer)] + \
                    ([("norms", block.output_norm)] if block.output_norm else [])
                for part, tapped in steps:
                    if part not in parts:
                        continue
                    inputs, _ = _capture(pruned_layer, {tapped: "input"}, pruned_hidden, kwargs, index, masks)
                    if part == "readers":
                        _refit_readers(dense_layer, pruned_layer, block.readers, targets[tapped],
                                       inputs[tapped], alpha)
                    elif part == "writers":
                        _refit_writer(pruned_layer.get_submodule(tapped), targets[tapped], inputs[tapped],
                                      alpha)
                    else:
                        norm = pruned_layer.get_submodule(tapped)
                        _refit_gain(norm, adapter.norm_offset, c * targets[tapped][:, keep.to(
                            targets[tapped].device)], _normalised(norm, inputs[tapped]), alpha)
        pruned_hidden = _capture(pruned_layer, {}, pruned_hidden, kwargs, index, masks)[1]
        bar.update()

    pruned = slice_model(dense, keep, in_place, on_block=refit_block)
    bar.close()
    if head is not None:
        head.refit(pruned, dense_hidden, pruned_hidden, masks, alpha)
    return pruned


def _ridge(gram: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gram + lam I, lam) with lam = alpha x its mean diagonal; in place: a writer's Gram matrix is
    m x m float64 (0.7 GB at m = 9216), so no second copy and no identity matrix is made."""
    lam = alpha * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    return gram, lam


@torch.no_grad()
def _refit_readers(dense_layer: nn.Module, pruned_layer: nn.Module, names: tuple[str, ...], n: torch.Tensor,
                   n_pruned: torch.Tensor, alpha: float) -> None:
    """Solve for the pruned readers `names` given dense inputs n (T x d) and pruned inputs (T x K), both
    float64: a Gram matrix summed over ~10^4 tokens is too ill-conditioned for float32, let alone the
    bfloat16 a GPU computes in."""
    n_pruned = n_pruned.to(n.device)
    system, lam = _ridge(n_pruned.T @ n_pruned, alpha)  # K x K
    cross = n.T @ n_pruned  # d x K
    for name in names:
        weight = dense_layer.get_submodule(name).weight.to(cross.device, torch.float64)
        target = pruned_layer.get_submodule(name).weight
        # out x K; target holds W_K (the plain sliced weight)
        rhs = weight @ cross + lam * target.to(cross.device, torch.float64)
        solved = torch.linalg.solve(system, rhs.T).T  # system is symmetric
        target.copy_(solved.to(target.device, target.dtype))


@torch.no_grad()
def _refit_writer(writer: nn.Linear, z: torch.Tensor, z_pruned: torch.Tensor, alpha: float) -> None:
    """Refit the pruned writer's rows W' (K x m) so W' z' ~ W'_0 z: its output on the dense input, given
    the pruned input (W'_0 = c W_K is the plain slice of the dense writer, see the module doc)."""
    z_pruned = z_pruned.to(z.device)
    system, lam = _ridge(z_pruned.T @ z_pruned, alpha)  # m x m
    cross = z.T @ z_pruned
    cross.diagonal().add_(lam)
    rhs = (writer.weight.to(z.device, torch.float64) @ cross).T
    del cross  # one m x m matrix fewer while solving
    solved = torch.linalg.solve(system, rhs).T
    writer.weight.copy_(solved.to(writer.weight.device, writer.weight.dtype))


def _normalised(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's input normalised without its gain: x / sqrt(mean(x^2) + eps)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@torch.no_grad()
def _refit_gain(norm: nn.Module, offset: float, target: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """Per dim k: the gain a_k (offset + w_k) that best maps b_k to target_k, ridge towards its value."""
    b = b.to(target.device)
    a0 = offset + norm.weight.to(target.device, torch.float64)
    energy = b.square().sum(0)
    lam = alpha * energy.mean()
    a = ((b * target).sum(0) + lam * a0) / (energy + lam)
    norm.weight.copy_((a - offset).to(norm.weight.device, norm.weight.dtype))


class _HeadTarget:
    """What the head refit needs from the dense model, taken before the slice may overwrite it: the
    final norm, and the Gram matrix G = E^T E of the LM head E (d x d, float64). The sliced head is
    E' = s E[:, kept], so E'^T E' = s^2 G[kept, kept] and E'^T E = s G[kept, :]."""

    def __init__(self, dense: PreTrainedModel, keep: torch.Tensor) -> None:
        adapter = adapter_for(dense.config)
        self.norm = copy.deepcopy(dense.get_submodule(adapter.final_norm))
        self.offset, self.final_norm = adapter.norm_offset, adapter.final_norm
        self.keep, self.scale = keep, head_scale(dense, len(keep))
        head = dense.get_output_embeddings()
        with onloaded(head):
            weight = head.weight
            device = weight.device
            self.gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)
            for start in range(0, weight.shape[0], 1 << 15):  # vocabulary chunks: bounded float64 copies
                rows = weight[start:start + (1 << 15)].to(torch.float64)
                self.gram += rows.T @ rows

    @torch.no_grad()
    def refit(self, pruned: nn.Module, dense_hidden, pruned_hidden, masks, alpha: float) -> None:
        """Refit the pruned final norm's gains so its logits match the dense model's (see the module doc)."""
        norm = pruned.get_submodule(self.final_norm)

        def rows(hidden: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([h[m.to(h.device).bool()] for h, m in zip(hidden, masks, strict=True)])

        device = execution_device(norm)
        n = self.norm(rows(dense_hidden).to(execution_device(self.norm))).to(device, torch.float64)
        b = _normalised(norm, rows(pruned_hidden).to(device, torch.float64))
        keep, gram = self.keep.to(self.gram.device), self.gram
        system = (self.scale ** 2 * gram[keep][:, keep]).to(device) * (b.T @ b)
        rhs = ((self.scale * gram[keep]).to(device) * (n.T @ b).T).sum(1)
        a0 = self.offset + norm.weight.to(device, torch.float64)
        lam = alpha * system.diagonal()
        a = torch.linalg.solve(system + torch.diag(lam), rhs + lam * a0)
        norm.weight.copy_((a - self.offset).to(norm.weight.device, norm.weight.dtype))
