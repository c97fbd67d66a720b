"""Profile: per-dimension importance of the hidden (residual-stream) axis, from forward passes only.

DIET's score for dimension k on a task is the mean |activation| over all blocks, then over all tokens
and samples. Averages are linear, so we keep token-weighted sums per dimension (padding excluded) and
divide at the end; sums from several processes or runs add up exactly.

Data parallel: under torch.distributed (e.g. `torchrun --nproc-per-node 2 -m dietprune.cli profile`),
each process profiles every world-th text and the sums are all-reduced, so every process holds the
same totals as a single-process run (up to float summation order).

Activation sites (the paper does not say which; `block_output` is our default):
  block_output  the residual stream after each decoder block (one vector per block and token)
  norm_output   the normalised inputs of the linear layers (each residual norm's output)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dietprune.calibration import ForwardPass, process_group, token_batches
from dietprune.errors import DietError
from dietprune.models.adapters import adapter_for
from dietprune.settings import AGGREGATIONS, SITES


@dataclass
class ActivationStats:
    """Sums over profiled tokens of per-dimension activation statistics, averaged over sites."""

    sum_abs: torch.Tensor  # (d,) float64: sum over tokens of mean over sites of |a_k|
    sum_sq: torch.Tensor  # (d,) float64: sum over tokens of mean over sites of a_k^2
    tokens: int

    def score(self, aggregation: str = "l1") -> torch.Tensor:
        """Per-dimension importance: mean |a| (l1, DIET's) or root mean square (l2)."""
        if aggregation == "l1":
            return self.sum_abs / self.tokens
        if aggregation == "l2":
            return (self.sum_sq / self.tokens).sqrt()
        raise DietError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")

    @classmethod
    def fixed(cls, score: torch.Tensor) -> ActivationStats:
        """Stats whose l1 and l2 scores both equal `score` (for data-free methods)."""
        return cls(score.double(), score.double().square(), 1)

    def __add__(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats(self.sum_abs + other.sum_abs, self.sum_sq + other.sum_sq,
                               self.tokens + other.tokens)


def site_modules(model: nn.Module, site: str) -> list[nn.Module]:
    """The modules whose outputs are profiled for `site`."""
    adapter = adapter_for(model.config)
    layers = model.get_submodule(adapter.layers)
    if site == "block_output":
        return list(layers)
    if site == "norm_output":
        return [layer.get_submodule(name) for layer in layers for name in adapter.input_norms]
    raise DietError(f"unknown activation site {site!r}; choose one of {', '.join(SITES)}")


def profile(model: nn.Module, tokenizer, texts, site: str = "block_output", batch_size: int = 8,
            max_length: int = 1024, desc: str = "profile") -> ActivationStats:
    """Run `texts` through `model` and accumulate activation statistics at `site` (hooks only).

    Each batch (at most `calibration.MAX_BATCH_TOKENS` tokens) is summed in float32, whatever the
    compute dtype: a bfloat16 sum of thousands of terms keeps only ~3 significant digits. The batch
    sums accumulate in float64 on the model's device, so a task's total over ~10^5 tokens keeps every
    batch's digits and data-parallel shards add up to the single-process totals."""
    modules = site_modules(model, site)
    d = model.config.hidden_size
    device = model.get_input_embeddings().weight.device
    sum_abs = torch.zeros(d, dtype=torch.float64, device=device)
    sum_sq = torch.zeros(d, dtype=torch.float64, device=device)

    def accumulate(hidden: torch.Tensor) -> None:
        hidden = hidden.float()
        sum_abs.add_(hidden.abs().sum(0).to(device, torch.float64), alpha=1 / len(modules))
        sum_sq.add_(hidden.square().sum(0).to(device, torch.float64), alpha=1 / len(modules))

    run = ForwardPass(model)
    for module in modules:
        run.on_output(module, accumulate)
    tokens = run.run(token_batches(tokenizer, texts, batch_size, max_length, shard=True), desc)
    stats = ActivationStats(sum_abs, sum_sq, tokens)
    if process_group()[1] > 1:
        stats = _all_reduce(stats)
    return ActivationStats(stats.sum_abs.cpu(), stats.sum_sq.cpu(), stats.tokens)


def _all_reduce(stats: ActivationStats) -> ActivationStats:
    """Sum every process's statistics (all processes get the total)."""
    tokens = torch.tensor([float(stats.tokens)], dtype=torch.float64, device=stats.sum_abs.device)
    packed = torch.cat([stats.sum_abs, stats.sum_sq, tokens])
    dist.all_reduce(packed)
    d = len(stats.sum_abs)
    return ActivationStats(packed[:d], packed[d:2 * d], int(packed[-1]))
