"""Profile: per-dimension importance of the hidden (residual-stream) axis, from forward passes only.

DIET's score for dimension k on a task is the mean |activation| over all blocks, then over all tokens
and samples. Averages are linear, so we keep token-weighted sums per dimension (padding excluded) and
divide at the end; sums from several processes or runs add up exactly. Every task is profiled in the
same sequential pass (each block read once for all of them).

Data parallel: under torch.distributed (e.g. `torchrun --nproc-per-node 2 -m dietprune.cli profile`),
each process profiles every world-th text of each task and the sums are all-reduced, so every process
holds the same totals as a single-process run (up to float summation order).

Activation sites (the paper does not say which; `block_output` is our default):
  block_output  the residual stream after each decoder block (one vector per block and token)
  norm_output   the normalised inputs of the linear layers (each residual norm's output)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dietprune.calibration import Batching, Corpus, all_sum, corpus_batches
from dietprune.errors import DietError
from dietprune.sequential import Observer, Weights, capture, observe
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


class Profile(Observer):
    """DIET's statistics, per corpus: token-weighted sums of |a_k| and a_k^2 at `site`, each averaged over
    the site's tensors (every block's output, or every residual norm's output).

    Each batch is summed in float32, whatever the compute dtype (a bfloat16 sum of thousands of terms
    keeps ~3 significant digits), and accumulated in float64 on the device, so a task's total over
    ~10^5 tokens keeps every batch's digits and data-parallel shards add up to one process's totals."""

    def __init__(self, site: str, width: int, n_layers: int, n_groups: int, device: torch.device):
        if site not in SITES:
            raise DietError(f"unknown activation site {site!r}; choose one of {', '.join(SITES)}")
        self.sites = frozenset({site})
        self.per = n_layers * (2 if site == "norm_output" else 1)  # tensors averaged over
        self.sum_abs = torch.zeros(n_groups, width, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n_groups, width, dtype=torch.float64, device=device)

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        x = x.float()
        self.sum_abs[group].add_(x.abs().sum(0).to(self.sum_abs.device, torch.float64), alpha=1 / self.per)
        self.sum_sq[group].add_(x.square().sum(0).to(self.sum_sq.device, torch.float64), alpha=1 / self.per)

    def result(self, tokens: list[int]) -> list[ActivationStats]:
        """Per corpus, its statistics (`tokens`: its real tokens), summed over data-parallel processes."""
        counts = torch.tensor(tokens, dtype=torch.float64, device=self.sum_abs.device)[:, None]
        packed = all_sum(torch.cat([self.sum_abs, self.sum_sq, counts], dim=1))
        d = self.sum_abs.shape[1]
        sum_abs, sum_sq, counts = packed[:, :d], packed[:, d:2 * d], packed[:, -1]
        return [ActivationStats(a.cpu(), q.cpu(), int(n)) for a, q, n in zip(sum_abs, sum_sq, counts,
                                                                             strict=True)]


def profile(weights: Weights, tokenizer, corpora: list[Corpus], sites: tuple[str, ...], batching: Batching,
            extra: tuple[Observer, ...] = (), desc: str = "profile") -> dict[str, list[ActivationStats]]:
    """Per site, per corpus, the activation statistics: one sequential pass over the blocks with every
    corpus's batches (this process's shard of them under torch.distributed), every site tapped in it.
    `extra` observers ride along in the same pass (a method's weight statistics)."""
    batches, groups = corpus_batches(tokenizer, corpora, batching, shard=True)
    stream = capture(weights, batches, groups)
    where = stream.storage if stream.storage.type != "cpu" else weights.device
    width, layers = weights.model.config.hidden_size, len(weights.blocks)
    observers = {site: Profile(site, width, layers, len(corpora), where) for site in sites}
    observe(weights, stream, [*observers.values(), *extra], desc)
    tokens = [stream.tokens(i) for i in range(len(corpora))]
    return {site: observer.result(tokens) for site, observer in observers.items()}
