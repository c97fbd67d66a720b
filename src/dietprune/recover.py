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
head (the final norm's gains through the LM head E, K parameters): the logits E' (a * b') ~ E n over
    calibration tokens: [(E'^T E') * (sum b' b'^T)] a = rowsum((E'^T E) * (sum n b'^T)^T).
linear head (--recover-head linear): the head's K columns become E T, T (d x K) the map from the pruned
    final norm's output f (as the head multiplies it) to the dense one's n that fits the logits,
        T = argmin sum_t ||E T f - E n||^2 + lam ||E (T - P)||^2  =  (C_nf + lam P)(C_ff + lam I)^-1,
    P the plain slice's column selection: E^T E cancels (the vocabulary never enters the solve), and T
    holds the regression of the dropped dims on the kept ones. An untied head is fitted last, on the
    pruned model's own final states (it subsumes the gains). A tied head is the embedding too, so T is
    fitted first, on the dense model's final states masked to the kept dims (what the pruned stream
    approximates; f is then the masked norm's output on them), the pruned stream enters block 0 as
    c h T (the embedding E T), and the gains are refit through E T at the end. Measured on Gemma-3 270M
    at 20%, on the dense model's own final states: the slice at the head alone takes LAMBADA perplexity
    from 40.9 to 108, the gains to 98, T to 48.6; end to end, perplexity 73.8 instead of 79.7 and the
    tasks -0.5 +- 0.6 points, so not the default (docs/RESULTS.md, ninth round). The tied fit costs one
    more pass of the dense blocks.
MLP channels (--mlp-sparsity): down_proj's fit over its m inputs has the Hessian C_z'z' + lam I whatever
    its target, so greedy OBS (removal_order) on the best all-input fit W* says which inputs the refit of
    the others absorbs best; the m - M that go leave gate/up's rows and down_proj's columns, and the
    writer is refit on the M that stay (the same system, restricted). Every layer keeps the same M (a
    stock config has one intermediate_size) and picks its own; the greedy steps cost O(m^2) each.
Damping grid (--recover-alpha-grid): every fourth batch is held out; each reader's and writer's fit on
    the other batches is scored, for each alpha of the grid, by its error on the held-out ones less their
    targets' energy (the same for every fit), tr(W G_h W^T) - 2 tr(W R_h^T), from the held-out Gram
    matrix G_h and right-hand side R_h = sum t x^T; the best alpha is refit on all batches. The held-out
    statistics double each accumulator, and scoring holds two more copies of the Gram matrix.
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
from dietprune.models.adapters import SubBlock
from dietprune.models.edit import meta_model
from dietprune.progress import progress
from dietprune.sequential import (
    StopForward,
    Stream,
    Weights,
    capture,
    observe,
    run_module,
    to_device,
    to_meta,
)
from dietprune.slice import head_scale, slice_edit

PARTS = ("readers", "writers", "norms", "head")
HEAD_ROWS = 1 << 12  # vocabulary rows per product of the head's Gram matrix
PRODUCTS = torch.float32  # the writers' Gram and the readers' cross products per batch (module doc)
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
    columns = _head_columns(weights, _final_stream(weights, dense), None, keep, alpha, c) \
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
        columns = _head_columns(weights, dense, pruned, keep, alpha, c)
    elif "head" in parts:
        gains = _head_statistics(weights, dense, pruned, keep, alpha, columns)
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
    keep = keep.to(device)
    chosen = []

    def rows(b: int, x: torch.Tensor) -> torch.Tensor:  # batch b's real tokens, in PRODUCTS
        return dense.real(b, x).to(PRODUCTS)

    normed = [norm(dense.hidden[b].to(device)) for b in batches]  # the sub-block's inputs, computed once
    fit_normed = [fit_norm(pruned.hidden[b].to(device)) for b in batches]

    if "readers" in parts:  # (1) W' = (W C_nn' + lam W_K)(C_n'n' + lam I)^-1
        k, d = len(keep), dense.hidden[0].shape[-1]
        gram, cross = _zeros(k, k, device, 2 if held else 1), _zeros(d, k, device, 2 if held else 1)
        for b in batches:
            n, n_fit = rows(b, normed[b]), rows(b, fit_normed[b])
            stack = slice(2 if b in held else 1)  # all batches, and the held-out ones
            _accumulate_gram(gram[stack], n_fit.double())
            _accumulate(cross[stack], n, n_fit)
        all_sum(gram), all_sum(cross)
        alphas = dict.fromkeys(block.readers, alpha)
        if held:
            fits, held_gram = _held_out_fits(gram, grid)
            for name in block.readers:
                weight, prior = (module.get_submodule(name).weight.double() for module in (dense_layer, fit))
                alphas[name] = _chosen(fits, held_gram, weight @ cross, prior)
            del fits, held_gram
        for a in sorted(set(alphas.values())):  # one factorisation per damping
            system = gram[0].clone() if held else gram[0]
            lam = _damp(system, a)
            factor = _cholesky(system)
            for name in (name for name in block.readers if alphas[name] == a):
                weight, target = dense_layer.get_submodule(name).weight, fit.get_submodule(name).weight
                rhs = weight.to(torch.float64) @ cross[0] + lam * target.to(torch.float64)
                target.copy_(_solve(factor, rhs.T).T)
            del system, factor
        chosen += [alphas[name] for name in block.readers] if held else []
        del gram, cross

    # (2) dense outputs y (the writer's), pruned writer inputs z' (the refit module stopped at the writer)
    writer = fit.get_submodule(block.writer)
    outputs = [run_module(dense_layer, block, n, kwargs[b]) for b, n in enumerate(normed)]
    z_fit = [_writer_input(fit, block, n_fit, kwargs[b]) for b, n_fit in enumerate(fit_normed)]
    del normed, fit_normed
    if "writers" in parts:  # W' = (R + lam W'_0)(C_z'z' + lam I)^-1, R = sum c y_K z'^T = W'_0 C_zz'
        m = z_fit[0].shape[-1]
        gram, cross = _zeros(m, m, device, 2 if held else 1), _zeros(len(keep), m, device, 2 if held else 1)
        for b in batches:
            z = rows(b, z_fit[b])
            stack = slice(2 if b in held else 1)
            _accumulate_gram(gram[stack], z)
            _accumulate(cross[stack], rows(b, outputs[b])[:, keep].double(), z.double(), scale=c)
        all_sum(gram), all_sum(cross)
        writer_alpha = alpha
        if held:
            writer_alpha = _chosen(*_held_out_fits(gram, grid), cross, writer.weight.double())
            chosen.append(writer_alpha)
        gram, cross = gram[0], cross[0]
        lam = _damp(gram, writer_alpha)
        cross.add_(writer.weight.to(torch.float64), alpha=lam)
        if inputs is not None:
            kept = _kept_inputs(gram, cross, inputs)
            _keep_inputs(fit, block, kept)
            gram, cross = gram[kept][:, kept], cross[:, kept]  # sorted: the lower triangle stays lower
            z_fit = [z[..., kept] for z in z_fit]
        factor = _cholesky(gram)
        del gram
        writer.weight.copy_(_solve(factor, cross.T).T)
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
                x = _normalised(fit_norm_out, rows(b, fit_outputs[b]).double())
                energy += x.square().sum(0)
                product += (x * target).sum(0)
            all_sum(energy), all_sum(product)
            a0 = offset + fit_norm_out.weight.to(torch.float64)
            lam = alpha * energy.mean()
            fit_norm_out.weight.copy_((product + lam * a0) / (energy + lam) - offset)
        fit_outputs = [fit_norm_out(y) for y in fit_outputs]

    for b in batches:  # (4) both streams past the sub-block
        dense.hidden[b] = (dense.hidden[b].to(device) + outputs[b]).to(dense.storage)
        pruned.hidden[b] = (pruned.hidden[b].to(device) + fit_outputs[b]).to(pruned.storage)
    return chosen


def _zeros(rows: int, columns: int, device: torch.device, count: int) -> torch.Tensor:
    """`count` float64 accumulators of rows x columns: the statistics of all batches, then (with a
    damping grid) of the held-out ones."""
    return torch.zeros(count, rows, columns, dtype=torch.float64, device=device)


def _held_out_fits(gram: torch.Tensor, grid: tuple[float, ...]
                   ) -> tuple[dict[float, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """From the (all, held-out) Gram matrices (lower triangles): per damping of `grid`, the Cholesky
    factor and lam of the system on the batches not held out, and the held-out Gram matrix (symmetric).
    Shared by every fit on the same inputs (a norm site's readers)."""
    fits = {}
    for alpha in grid:
        system = gram[0] - gram[1]
        lam = _damp(system, alpha)
        fits[alpha] = _cholesky(system), lam
    return fits, _symmetric(gram[1])


def _chosen(fits: dict[float, tuple[torch.Tensor, torch.Tensor]], held: torch.Tensor, rhs: torch.Tensor,
            prior: torch.Tensor) -> float:
    """The damping whose fit on the batches not held out predicts the held-out ones best. `fits`, `held`:
    from _held_out_fits; rhs: (all, held-out) right-hand sides R = sum t x^T. A fit W is scored by its
    held-out error less the target's energy, tr(W G_h W^T) - 2 tr(W R_h^T)."""
    errors = {}
    for alpha, (factor, lam) in fits.items():
        fit = _solve(factor, (rhs[0] - rhs[1] + lam * prior).T).T
        errors[alpha] = float(((fit @ held) * fit).sum() - 2 * (fit * rhs[1]).sum())
    return min(errors, key=errors.get)


def _kept_inputs(gram: torch.Tensor, cross: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` writer inputs greedy OBS keeps (ascending), from the damped Gram matrix (its lower
    triangle) and the right-hand side of the writer's fit: the best fit on all inputs, W* = cross G^-1,
    gives the form W*^T W*; the inputs whose loss the others' refit absorbs best go first."""
    best = _solve(_cholesky(gram.tril()), cross.T).T
    order, _ = removal_order((best.T @ best)[None], _symmetric(gram)[None], len(gram) - count, alpha=0.0)
    alive = torch.ones(len(gram), dtype=torch.bool, device=gram.device)
    alive[order.to(gram.device)] = False
    return alive.nonzero()[:, 0]


def _symmetric(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle `lower` holds (a Gram matrix accumulated below the
    diagonal only), as a new tensor."""
    return lower.tril() + lower.tril(-1).T


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


def removal_order(forms: torch.Tensor, grams: torch.Tensor, remove: int, alpha: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `remove` inputs greedy OBS drops, in order, and the relative error each one adds (summed over
    sites), from the forms M = W*^T W* (sites, m, m; W* the best fit on all m inputs) and the inputs'
    Gram matrices G (sites, m, m), damped here by alpha x the mean diagonal. One input at a time (the OBS
    recursion of Hassibi & Stork, in SparseGPT's column form), with H = G^-1:

        cost(j) = M_jj / H_jj / tr(M G);   then, u = H[:, j] / H_jj, v = M[:, j]:
        M <- M - u v^T - v u^T + M_jj u u^T,   H <- H - H_jj u u^T,

    the least-squares error the refit of the others cannot absorb (relative to the site's output energy,
    so that no site outweighs another by scale); the costs of the inputs removed one after another add
    up to the error of the set."""
    gram = grams.double().clone()
    diagonal = gram.diagonal(dim1=1, dim2=2)
    diagonal += alpha * diagonal.mean(1, keepdim=True)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    form = forms.double() / torch.einsum("sij,sji->s", forms.double(), gram)[:, None, None]
    alive = torch.ones(form.shape[-1], dtype=torch.bool, device=form.device)
    order, costs = [], []
    for _ in range(remove):
        cost = (form.diagonal(dim1=1, dim2=2) / inverse.diagonal(dim1=1, dim2=2)).sum(0)
        cost = torch.where(alive, cost, torch.inf)
        j = int(cost.argmin())
        h = inverse[:, :, j].clone()
        u = h / h[:, j:j + 1]
        v = form[:, :, j].clone()
        w = v - v[:, j:j + 1] * u
        form.baddbmm_(torch.stack([u, w], 2), torch.stack([v, u], 1), alpha=-1)
        inverse.baddbmm_(h[:, :, None], u[:, None, :], alpha=-1)
        alive[j] = False
        order.append(j)
        costs.append(float(cost[j]))
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)



def _writer_input(layer: nn.Module, block: SubBlock, normed: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input the sub-block's writer receives (the module stops there)."""
    seen = []

    def stop(z: torch.Tensor) -> None:
        seen.append(z)
        raise StopForward

    run_module(layer, block, normed, kwargs, stop)
    return seen[0]


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    """total += scale a^T b: one batch's (or chunk of rows') product in the dtype of a and b, the running
    sum in total's float64 (a stack of totals: the one product added to each)."""
    total.add_(a.T @ b, alpha=scale)


def _accumulate_gram(total: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """The lower triangle of total += x^T x, by column blocks: only the blocks on and below the diagonal
    are multiplied (10 of 16 at 4 blocks). The rest of the upper triangle is left as it is: the damping
    reads the diagonal, the Cholesky factorisation the lower triangle. A stack of totals gets each block
    product once, added to each."""
    step = -(-x.shape[1] // blocks)
    for i in range(0, x.shape[1], step):
        total[..., i:, i:i + step].add_(x[:, i:].T @ x[:, i:i + step])


def _damp(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """lam = alpha x the mean diagonal, added to the diagonal in place (a writer's Gram matrix is
    m x m float64: 0.7 GB at m = 9216, 6.6 GB at 28672; no copy and no identity matrix is made)."""
    lam = alpha * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    return lam


def _cholesky(system: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The lower Cholesky factor L of a damped (symmetric positive definite) Gram matrix, written over its
    lower triangle block by block (right-looking): no second m x m matrix is ever made (LAPACK through
    torch copies the matrix first: 6.6 GB more at a 70B model's MLP width). Memory: one panel."""
    n = len(system)
    try:
        for j in range(0, n, block):
            e = min(j + block, n)
            system[j:e, j:e] = torch.linalg.cholesky(system[j:e, j:e])
            if e == n:
                break
            panel = torch.linalg.solve_triangular(system[j:e, j:e].T, system[e:, j:e], upper=True, left=False)
            system[e:, j:e] = panel
            for i in range(e, n, block):  # the lower part of the trailing matrix, a block row at a time
                end = min(i + block, n)
                system[i:end, e:end].addmm_(panel[i - e:end - e], panel[:end - e].T, alpha=-1)
    except torch.linalg.LinAlgError as exc:
        raise DietError("recovery's least-squares system is singular (no calibration tokens, or "
                        "--recover-alpha 0 with too few); use a positive --recover-alpha") from exc
    return system


def _solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (L L^T) X = rhs, L the lower triangle of `factor`: two triangular solves, the second in
    place (the factor is read where it is, never copied)."""
    y = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.T, y, upper=True, out=y)


def _final_stream(weights: Weights, dense: Stream) -> Stream:
    """The dense model's final norm input for every batch of `dense` (left as it is): one pass of the
    blocks."""
    final = dense.mapped(lambda h: h)
    observe(weights, final, [], desc="head map")
    return final


def _head_columns(weights: Weights, dense: Stream, pruned: Stream | None, keep: torch.Tensor, alpha: float,
                  c: float) -> torch.Tensor:
    """T (d x K, float64) of the linear head refit (module doc) from the final norm inputs of the dense
    stream and of the pruned one (K dims, c times the dense scale), or, without it, of the dense stream
    masked to the kept dims. Both go through the dense final norm with the dropped dims zero, which
    gives the pruned final norm's output as the head multiplies it (slice.py's scales)."""
    with weights.onloaded(weights.adapter.final_norm) as norm:
        device = weights.device_of(norm)
        keep = keep.to(device)
        d, k = weights.model.config.hidden_size, len(keep)
        gram, cross = _zeros(k, k, device, 1)[0], _zeros(d, k, device, 1)[0]
        for b in range(len(dense)):
            h = dense.hidden[b].to(device)
            masked = torch.zeros_like(h)
            masked[..., keep] = h[..., keep] if pruned is None else pruned.hidden[b].to(device, h.dtype) / c
            f = dense.real(b, norm(masked)[..., keep])
            _accumulate_gram(gram, f.double())
            _accumulate(cross, dense.real(b, norm(h)).to(PRODUCTS), f.to(PRODUCTS))
    all_sum(gram), all_sum(cross)
    lam = _damp(gram, alpha)
    cross[keep, torch.arange(k, device=device)] += lam  # + lam P
    return _solve(_cholesky(gram), cross.T).T


def _head_statistics(weights: Weights, dense: Stream, pruned: Stream, keep: torch.Tensor, alpha: float,
                     columns: torch.Tensor | None = None):
    """What refitting the final norm's gains through the LM head E needs, taken before the head is
    sliced: B^T B and N^T B over calibration tokens (N the dense final norm's output, B the pruned final
    stream normalised without gain) and G = E^T E (d x d, summed over chunks of the head's rows). The
    sliced head is E' = s E P (P = `columns`, or the kept columns' selection), so E'^T E' = s^2 P^T G P
    and E'^T E = s P^T G. Returns refit(sliced gain, norm offset, s) -> the refit gain."""
    with weights.onloaded(weights.adapter.final_norm) as norm:
        device = weights.device_of(norm)
        keep = keep.to(device)
        d, k = weights.model.config.hidden_size, len(keep)
        btb = torch.zeros(k, k, dtype=torch.float64, device=device)
        ntb = torch.zeros(d, k, dtype=torch.float64, device=device)
        for b in range(len(dense)):
            n = dense.real(b, norm(dense.hidden[b].to(device))).double()
            x = _normalised(norm, dense.real(b, pruned.hidden[b].to(device)).double())
            _accumulate(btb, x, x)
            _accumulate(ntb, n, x)
    all_sum(btb), all_sum(ntb)
    gram = head_gram(weights, device)
    if columns is None:
        kept_gram, kept_cross = gram[keep][:, keep], gram[keep]
    else:
        kept_cross = columns.to(device).T @ gram
        kept_gram = kept_cross @ columns.to(device)

    def refit(weight: torch.Tensor, offset: float, scale: float) -> torch.Tensor:
        system = scale ** 2 * kept_gram * btb
        rhs = ((scale * kept_cross) * ntb.T).sum(1)
        a0 = offset + weight.to(device, torch.float64)
        lam = alpha * system.diagonal()
        system.diagonal().add_(lam)  # SPD: a Hadamard product of two Gram matrices (Schur), damped
        a = _solve(_cholesky(system), (rhs + lam * a0)[:, None])[:, 0]
        return (a - offset).to(weight.device, weight.dtype)

    return refit


def head_gram(weights: Weights, device: torch.device) -> torch.Tensor:
    """E^T E of the LM head E (d x d, float64, on `device`), summed over chunks of its rows (a streamed
    head is read a chunk at a time)."""
    d = weights.model.config.hidden_size
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for rows in weights.rows(f"{weights.head}.weight", HEAD_ROWS):
        rows = rows.to(device, torch.float64)
        _accumulate(gram, rows, rows)
    return gram


def _normalised(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's input normalised without its gain: x / sqrt(mean(x^2) + eps)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
