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
        W' = W'_0 (C_zz' + lam I) (C_z'z' + lam I)^-1,   W'_0 = c W_K (the plain slice),
    accumulated as R = W'_0 C_zz' = sum_t c y_K z'^T (y = W z, the dense writer's output), so only one
    m x m matrix exists; it is factorised over itself, by blocks (Cholesky: the system is symmetric
    positive definite), and solved by two triangular solves.
norms (the output norms of Gemma-2/3, one gain per dim): their input is normalised over K dims
    instead of d, so a kept dim's share of the energy decides its scale (measured on Gemma-3 270M at
    20%: as little as 21% of a writer's output energy stays, making that update 2.2x too large). Each
    gain a_k = offset + w_k is refit by least squares: a_k = (sum_t b_k o_k + lam a0_k) / (sum_t b_k^2 + lam)
    with b' the pruned input normalised without gain and o the dense norm output on dim k, times c.
head (head_refit.py): the final norm's K gains refit through the LM head, so that the logits match;
    with --recover-head linear, the head's columns refit as a linear map of the kept dims instead.
MLP channels (--mlp-sparsity): down_proj's fit over its m inputs has the Hessian C_z'z' + lam I whatever
    its target, so greedy OBS (lstsq.removal_order) on the best all-input fit W* says which inputs the
    refit of the others absorbs best; the m - M that go leave gate/up's rows and down_proj's columns, and the
    writer is refit on the M that stay (the same system, restricted). Every layer keeps the same M (a
    stock config has one intermediate_size) and picks its own; the greedy steps cost O(m^2) each.
Damping grid (--recover-alpha-grid): every fourth batch is held out; each reader's and writer's fit on
    the other batches is scored, for each alpha of the grid, by its error on the held-out ones less their
    targets' energy (the same for every fit), tr(W G_h W^T) - 2 tr(W R_h^T), from the held-out Gram
    matrix G_h and right-hand side R_h = sum t x^T; the best alpha is refit on all batches. The held-out
    statistics double each accumulator, and scoring holds two more copies of the Gram matrix. Under
    torchrun each process holds out every fourth batch of its own share (other batches than one
    process holds out, so the dampings chosen may differ from a single process's).
Ridge towards the plain slice (not towards 0): nothing changes when nothing is pruned, and directions
the calibration data does not excite keep their sliced values. lam = alpha x the mean diagonal of the
Gram matrix (alpha = 0.1 by default: ten times GPTQ's dampening, better than 0.01 and 0.001 on every
measure in docs/RESULTS.md's third round). Statistics are summed over batches in float64 and solved
in float64. Each batch's products are float32 (twice float64's rate on a CPU's vector units) for the
writers' Gram matrices and the readers' cross products, most of the arithmetic; float64 for the rest,
where float32 moved the refit model's logits most (the writers' cross products: 1.2e-4 relative on
SmolLM2). Measured against all-float64 products: recovery 0.78x (SmolLM2) and 0.82x (Gemma-3 270M) the
time, logits within 2.9e-5 and 5.7e-6 relative. The readers' and writers' Gram matrices are accumulated
on and below the diagonal only (what the Cholesky factorisation reads).

How (sequential.py's walk, two streams side by side): the calibration batches' hidden states enter
block 0 as the dense stream h and the pruned one h' = c h_K. For each block, brought to the device once,
and each of its sub-blocks, stage by stage over all batches: (1) the norms' outputs give the readers'
Gram matrices, and the readers are refit; (2) the dense module and the refit pruned module (stopped at
its writer) give the writer's statistics, and the writer is refit; (3) the refit writer's outputs give
the output norm's gains; (4) both streams advance. Each piece of the dense and of the pruned block runs
once per batch, never the whole block once per refit. Memory holds the two streams,
one stage's intermediates and one block's statistics; the refit block goes to the sink (memory, the
dense block's own memory, or the output files) before the next block is read.

Data parallel (torchrun): each process carries every world-th calibration text of each corpus through
both streams, and every statistic above is a sum over tokens, so each is summed over the processes
(calibration.all_sum) before its solve; every process then solves the same system and holds the same
refit block, which carries its shard on. The first process alone keeps the pruned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dietprune.assemble import Sink, apply_rest
from dietprune.calibration import Batching, Corpus, all_sum, corpus_batches
from dietprune.errors import DietError
from dietprune.head_refit import final_stream, head_columns, head_statistics
from dietprune.lstsq import (
    accumulate,
    accumulate_gram,
    accumulators,
    as_products,
    cholesky,
    damp,
    removal_order,
    solve,
    symmetric,
)
from dietprune.models.adapters import SubBlock
from dietprune.models.edit import meta_model
from dietprune.progress import progress
from dietprune.sequential import (
    StopForward,
    Stream,
    Weights,
    capture,
    run_module,
    to_device,
    to_meta,
)
from dietprune.slice import head_scale, rms_normalised, slice_edit

PARTS = ("readers", "writers", "norms", "head")
HELD_OUT = 4  # with a damping grid, every fourth calibration batch is held out to choose from it


@dataclass(frozen=True)
class Refit:
    """What recovery refits, and how: `parts` (of PARTS) with ridge damping `alpha`; each reader's and
    writer's damping chosen from `grid` instead (alpha then damps only the norms and the head); the MLP
    channels every layer keeps (`channels`, chosen when its writer is refit; None: all); the head's refit
    with the "head" part (`head`: its final norm's gains, or a linear map of its columns)."""

    parts: tuple[str, ...]
    alpha: float
    grid: tuple[float, ...]
    channels: int | None
    head: str


@torch.inference_mode()
def recover(weights: Weights, tokenizer, corpora: list[Corpus], keep: torch.Tensor, refit: Refit,
            batching: Batching, sink: Sink, in_place: bool = False) -> list[float]:
    """Slice the model of `weights` to the dims `keep` and refit it as `refit` says, so that its modules'
    outputs match the dense model's on the corpora's texts (see the module doc); every finished tensor
    goes to `sink`. `in_place`: the dense tensors outside the blocks may be sliced in their own memory.
    Returns the dampings chosen from the grid, fit by fit."""
    parts, alpha = refit.parts, refit.alpha
    model, adapter = weights.model, weights.adapter
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    d, k = model.config.hidden_size, len(keep)
    c = math.sqrt(k / d)
    blocks_edit = slice_edit(model, keep)
    batches, _ = corpus_batches(tokenizer, corpora, batching, shard=True)
    if refit.grid:  # each process holds out every HELD_OUT-th batch of its own shard
        counts = torch.tensor([len(batches) // HELD_OUT, len(batches)], device=weights.device)
        held, total = all_sum(counts).tolist()
        if not held:
            raise DietError(f"--recover-alpha-grid holds out every {HELD_OUT}th calibration batch to choose "
                            f"a damping; the recovery set makes {total} batches")
    dense = capture(weights, batches)
    chosen: list[float] = []
    linear_head, tied = "head" in parts and refit.head == "linear", model.config.tie_word_embeddings
    columns = head_columns(weights, final_stream(weights, dense), None, keep, alpha, c) \
        if linear_head and tied else None

    def embedded(h: torch.Tensor) -> torch.Tensor:  # the pruned model's embedding output
        return c * (h[..., keep.to(h.device)] if columns is None else h @ columns.to(h.device, h.dtype))

    pruned = dense.mapped(embedded)
    layers = meta_model(blocks_edit.config).get_submodule(adapter.layers)  # the sliced blocks are refit in
    for i in progress(range(len(weights.blocks)), desc="recover", unit="block"):
        with weights.onloaded(f"{adapter.layers}.{i}") as layer:
            device = weights.device_of(layer)
            fit = layers[i]
            fit.load_state_dict(blocks_edit.block(i, layer.state_dict()), strict=True, assign=True)
            fit.to(device)
            kwargs = [to_device(kw[i], device) for kw in dense.kwargs]
            for block in adapter.sub_blocks:
                inputs = refit.channels if block.writer == adapter.down else None
                chosen += _refit_sub_block(layer, fit, block, dense, pruned, kwargs, keep, c, refit,
                                           adapter.norm_offset, device, inputs)
            sink.block(i, fit.state_dict(), layer)
            to_meta(fit)
    gains = None
    if linear_head and not tied:
        columns = head_columns(weights, dense, pruned, keep, alpha, c)
    elif "head" in parts:
        gains = head_statistics(weights, dense, pruned, keep, alpha, columns)
    final = f"{adapter.final_norm}.weight"

    def refit_final_norm(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return gains(tensor, adapter.norm_offset, head_scale(model, k)) if name == final and gains else tensor

    apply_rest(weights, slice_edit(model, keep, in_place, head_columns=columns), sink, refit_final_norm)
    return chosen


def _refit_sub_block(dense_layer: nn.Module, fit: nn.Module, block: SubBlock, dense: Stream, pruned: Stream,
                     kwargs: list[dict], keep: torch.Tensor, c: float, refit: Refit, offset: float,
                     device: torch.device, inputs: int | None = None) -> list[float]:
    """Refit one sub-block of `fit` (the sliced block) and advance both streams past it; with `inputs`,
    the writer keeps that many of its input channels (those greedy OBS drops last) and the readers'
    rows that make them; with a grid, each reader's and the writer's damping comes from it (returned,
    readers first)."""
    parts, alpha, grid = refit.parts, refit.alpha, refit.grid
    norm, fit_norm = dense_layer.get_submodule(block.norm), fit.get_submodule(block.norm)
    batches = range(len(dense))
    held = {b for b in batches if grid and b % HELD_OUT == HELD_OUT - 1}
    stacks = 2 if grid else 1  # with a grid, held-out statistics too (in every process: same shapes)
    keep = keep.to(device)
    chosen = []

    def rows(b: int, x: torch.Tensor) -> torch.Tensor:  # batch b's real tokens, in PRODUCTS
        return as_products(dense.real(b, x))

    normed = [norm(dense.hidden[b].to(device)) for b in batches]  # the sub-block's inputs, computed once
    fit_normed = [fit_norm(pruned.hidden[b].to(device)) for b in batches]

    if "readers" in parts:  # (1) W' = (W C_nn' + lam W_K)(C_n'n' + lam I)^-1
        k, d = len(keep), dense.hidden[0].shape[-1]
        gram, cross = accumulators(stacks, k, k, device), accumulators(stacks, d, k, device)
        for b in batches:
            n, n_fit = rows(b, normed[b]), rows(b, fit_normed[b])
            stack = slice(2 if b in held else 1)  # all batches, and the held-out ones
            accumulate_gram(gram[stack], n_fit.double())
            accumulate(cross[stack], n, n_fit)
        all_sum(gram)
        all_sum(cross)
        alphas = dict.fromkeys(block.readers, alpha)
        if grid:
            fits, held_gram = _held_out_fits(gram, grid)
            for name in block.readers:
                weight, prior = (module.get_submodule(name).weight.double() for module in (dense_layer, fit))
                alphas[name] = _chosen(fits, held_gram, weight @ cross, prior)
            del fits, held_gram
        for a in sorted(set(alphas.values())):  # one factorisation per damping
            system = gram[0].clone() if grid else gram[0]
            lam = damp(system, a)
            factor = cholesky(system)
            for name in (name for name in block.readers if alphas[name] == a):
                weight, target = dense_layer.get_submodule(name).weight, fit.get_submodule(name).weight
                rhs = weight.to(torch.float64) @ cross[0] + lam * target.to(torch.float64)
                target.copy_(solve(factor, rhs.T).T)
            del system, factor
        chosen += [alphas[name] for name in block.readers] if grid else []
        del gram, cross

    # (2) dense outputs y (the writer's), pruned writer inputs z' (the refit module stopped at the writer)
    writer = fit.get_submodule(block.writer)
    outputs = [run_module(dense_layer, block, n, kwargs[b]) for b, n in enumerate(normed)]
    z_fit = [_writer_input(fit, block, n_fit, kwargs[b]) for b, n_fit in enumerate(fit_normed)]
    del normed, fit_normed
    if "writers" in parts:  # W' = (R + lam W'_0)(C_z'z' + lam I)^-1, R = sum c y_K z'^T = W'_0 C_zz'
        m = z_fit[0].shape[-1]
        gram, cross = accumulators(stacks, m, m, device), accumulators(stacks, len(keep), m, device)
        for b in batches:
            z = rows(b, z_fit[b])
            stack = slice(2 if b in held else 1)
            accumulate_gram(gram[stack], z)
            accumulate(cross[stack], rows(b, outputs[b])[:, keep].double(), z.double(), scale=c)
        all_sum(gram)
        all_sum(cross)
        writer_alpha = alpha
        if grid:
            writer_alpha = _chosen(*_held_out_fits(gram, grid), cross, writer.weight.double())
            chosen.append(writer_alpha)
        gram, cross = gram[0], cross[0]
        lam = damp(gram, writer_alpha)
        cross.add_(writer.weight.to(torch.float64), alpha=lam)
        if inputs is not None:
            kept = _kept_inputs(gram, cross, inputs)
            _keep_inputs(fit, block, kept)
            gram, cross = gram[kept][:, kept], cross[:, kept]  # sorted: the lower triangle stays lower
            z_fit = [z[..., kept] for z in z_fit]
        factor = cholesky(gram)
        del gram
        writer.weight.copy_(solve(factor, cross.T).T)
        del cross, factor
    fit_outputs = [writer(z) for z in z_fit]
    del z_fit

    if block.output_norm:  # (3) per dim: a_k = (sum b_k t_k + lam a0_k) / (sum b_k^2 + lam)
        dense_norm = dense_layer.get_submodule(block.output_norm)
        fit_norm_out = fit.get_submodule(block.output_norm)
        outputs = [dense_norm(y) for y in outputs]
        if "norms" in parts:
            energy = torch.zeros(len(keep), dtype=torch.float64, device=device)
            product = torch.zeros(len(keep), dtype=torch.float64, device=device)
            for b in batches:
                target = c * rows(b, outputs[b])[:, keep].double()
                x = rms_normalised(fit_norm_out, rows(b, fit_outputs[b]).double())
                energy += x.square().sum(0)
                product += (x * target).sum(0)
            all_sum(energy)
            all_sum(product)
            a0 = offset + fit_norm_out.weight.to(torch.float64)
            lam = alpha * energy.mean()
            fit_norm_out.weight.copy_((product + lam * a0) / (energy + lam) - offset)
        fit_outputs = [fit_norm_out(y) for y in fit_outputs]

    for b in batches:  # (4) both streams past the sub-block
        dense.hidden[b] = (dense.hidden[b].to(device) + outputs[b]).to(dense.storage)
        pruned.hidden[b] = (pruned.hidden[b].to(device) + fit_outputs[b]).to(pruned.storage)
    return chosen


def _held_out_fits(gram: torch.Tensor, grid: tuple[float, ...]
                   ) -> tuple[dict[float, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """From the (all, held-out) Gram matrices (lower triangles): per damping of `grid`, the Cholesky
    factor and lam of the system on the batches not held out, and the held-out Gram matrix (symmetric).
    Shared by every fit on the same inputs (a norm site's readers)."""
    fits = {}
    for alpha in grid:
        system = gram[0] - gram[1]
        lam = damp(system, alpha)
        fits[alpha] = cholesky(system), lam
    return fits, symmetric(gram[1])


def _chosen(fits: dict[float, tuple[torch.Tensor, torch.Tensor]], held: torch.Tensor, rhs: torch.Tensor,
            prior: torch.Tensor) -> float:
    """The damping whose fit on the batches not held out predicts the held-out ones best. `fits`, `held`:
    from _held_out_fits; rhs: (all, held-out) right-hand sides R = sum t x^T. A fit W is scored by its
    held-out error less the target's energy, tr(W G_h W^T) - 2 tr(W R_h^T)."""
    errors = {}
    for alpha, (factor, lam) in fits.items():
        fit = solve(factor, (rhs[0] - rhs[1] + lam * prior).T).T
        errors[alpha] = float(((fit @ held) * fit).sum() - 2 * (fit * rhs[1]).sum())
    return min(errors, key=errors.get)


def _kept_inputs(gram: torch.Tensor, cross: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` writer inputs greedy OBS keeps (ascending), from the damped Gram matrix (its lower
    triangle) and the right-hand side of the writer's fit: the best fit on all inputs, W* = cross G^-1,
    gives the form W*^T W*; the inputs whose loss the others' refit absorbs best go first."""
    best = solve(cholesky(gram.tril()), cross.T).T
    order, _ = removal_order((best.T @ best)[None], symmetric(gram)[None], len(gram) - count, alpha=0.0)
    alive = torch.ones(len(gram), dtype=torch.bool, device=gram.device)
    alive[order.to(gram.device)] = False
    return alive.nonzero()[:, 0]


def _keep_inputs(fit: nn.Module, block: SubBlock, kept: torch.Tensor) -> None:
    """Cut `fit`'s sub-block down to the writer inputs `kept`: the readers' rows (and biases) that make
    them and the writer's columns that read them."""
    for name in block.readers:
        reader = fit.get_submodule(name)
        reader.weight = nn.Parameter(reader.weight[kept], requires_grad=False)
        if reader.bias is not None:
            reader.bias = nn.Parameter(reader.bias[kept], requires_grad=False)
        reader.out_features = len(kept)
    writer = fit.get_submodule(block.writer)
    writer.weight = nn.Parameter(writer.weight[:, kept], requires_grad=False)
    writer.in_features = len(kept)


def _writer_input(layer: nn.Module, block: SubBlock, normed: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input the sub-block's writer receives (the module stops there)."""
    seen = []

    def stop(z: torch.Tensor) -> None:
        seen.append(z)
        raise StopForward

    run_module(layer, block, normed, kwargs, stop)
    return seen[0]


