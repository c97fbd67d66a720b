"""The LM head's refit, recovery's last step (recover.py): what the final norm hands the head, made to
give the dense model's logits.

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
"""

from __future__ import annotations

import torch

from dietprune.calibration import all_sum, is_main_process
from dietprune.lstsq import accumulate, accumulate_gram, as_products, cholesky, damp, solve
from dietprune.sequential import Stream, Weights, observe
from dietprune.slice import rms_normalised

HEAD_ROWS = 1 << 12  # vocabulary rows per product of the head's Gram matrix


def final_stream(weights: Weights, dense: Stream) -> Stream:
    """The dense model's final norm input for every batch of `dense` (left as it is): one pass of the
    blocks."""
    final = dense.mapped(lambda h: h)
    observe(weights, final, [], desc="head map")
    return final


def head_columns(weights: Weights, dense: Stream, pruned: Stream | None, keep: torch.Tensor, alpha: float,
                 c: float) -> torch.Tensor:
    """T (d x K, float64) of the linear head refit (module doc) from the final norm inputs of the dense
    stream and of the pruned one (K dims, c times the dense scale), or, without it, of the dense stream
    masked to the kept dims. Both go through the dense final norm with the dropped dims zero, which
    gives the pruned final norm's output as the head multiplies it (slice.py's scales)."""
    with weights.onloaded(weights.adapter.final_norm) as norm:
        device = weights.device_of(norm)
        keep = keep.to(device)
        d, k = weights.model.config.hidden_size, len(keep)
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        cross = torch.zeros(d, k, dtype=torch.float64, device=device)
        for b in range(len(dense)):
            h = dense.hidden[b].to(device)
            masked = torch.zeros_like(h)
            masked[..., keep] = h[..., keep] if pruned is None else pruned.hidden[b].to(device, h.dtype) / c
            f = dense.real(b, norm(masked)[..., keep])
            accumulate_gram(gram, f.double())
            accumulate(cross, as_products(dense.real(b, norm(h))), as_products(f))
    all_sum(gram)
    all_sum(cross)
    lam = damp(gram, alpha)
    cross[keep, torch.arange(k, device=device)] += lam  # + lam P
    return solve(cholesky(gram), cross.T).T


def head_statistics(weights: Weights, dense: Stream, pruned: Stream, keep: torch.Tensor, alpha: float,
                    columns: torch.Tensor | None = None):
    """What refitting the final norm's gains through the LM head E needs, taken before the head is
    sliced: B^T B and N^T B over calibration tokens (N the dense final norm's output, B the pruned final
    stream normalised without gain) and G = E^T E (d x d, summed over chunks of the head's rows). The
    sliced head is E' = s E P (P = `columns`, or the kept columns' selection), so E'^T E' = s^2 P^T G P
    and E'^T E = s P^T G. Returns refit(sliced gain, norm offset, s) -> the refit gain (None in a
    data-parallel process after the first)."""
    with weights.onloaded(weights.adapter.final_norm) as norm:
        device = weights.device_of(norm)
        keep = keep.to(device)
        d, k = weights.model.config.hidden_size, len(keep)
        btb = torch.zeros(k, k, dtype=torch.float64, device=device)
        ntb = torch.zeros(d, k, dtype=torch.float64, device=device)
        for b in range(len(dense)):
            n = dense.real(b, norm(dense.hidden[b].to(device))).double()
            x = rms_normalised(norm, dense.real(b, pruned.hidden[b].to(device)).double())
            accumulate(btb, x, x)
            accumulate(ntb, n, x)
    all_sum(btb)
    all_sum(ntb)
    if not is_main_process():  # it keeps no model (assemble.DiscardSink): the head is not read for it
        return None
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
        a = solve(cholesky(system), (rhs + lam * a0)[:, None])[:, 0]
        return (a - offset).to(weight.device, weight.dtype)

    return refit


def head_gram(weights: Weights, device: torch.device) -> torch.Tensor:
    """E^T E of the LM head E (d x d, float64, on `device`), summed over chunks of its rows (a streamed
    head is read a chunk at a time)."""
    d = weights.model.config.hidden_size
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for rows in weights.rows(f"{weights.head}.weight", HEAD_ROWS):
        rows = rows.to(device, torch.float64)
        accumulate(gram, rows, rows)
    return gram
