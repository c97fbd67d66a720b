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

from dietprune.errors import DietError
from dietprune.models.adapters import adapter_for
from dietprune.progress import progress

SITES = ("block_output", "norm_output")
MAX_BATCH_TOKENS = 4096  # padded tokens per calibration forward pass
AGGREGATIONS = ("l1", "l2")


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


@torch.inference_mode()
def profile(model: nn.Module, tokenizer, texts: list[str], site: str = "block_output",
            batch_size: int = 8, max_length: int = 1024, desc: str = "profile") -> ActivationStats:
    """Run `texts` through `model` and accumulate activation statistics at `site` (hooks only).

    Texts are tokenized with the tokenizer's own special tokens, exactly as in evaluation."""
    modules = site_modules(model, site)
    d = model.config.hidden_size
    sum_abs = torch.zeros(d, dtype=torch.float64)
    sum_sq = torch.zeros(d, dtype=torch.float64)
    token_mask: torch.Tensor | None = None  # (batch, seq, 1) of the batch being run

    def accumulate(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).float() * token_mask
        sum_abs.add_(hidden.abs().sum((0, 1)).double(), alpha=1 / len(modules))
        sum_sq.add_(hidden.square().sum((0, 1)).double(), alpha=1 / len(modules))

    batches = calibration_batches(tokenizer, texts, batch_size, max_length, data_parallel=True)
    handles = [module.register_forward_hook(accumulate) for module in modules]
    tokens = 0
    try:
        for batch in progress(batches, desc=desc, unit="batch"):
            token_mask = batch["attention_mask"].unsqueeze(-1).to(model.dtype)
            model.get_decoder()(**batch)  # the LM head plays no part in the scores
            tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    stats = ActivationStats(sum_abs, sum_sq, tokens)
    return _all_reduce(stats) if _process_group()[1] > 1 else stats


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 1024,
                        data_parallel: bool = False) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the tokenized texts, longest first (similar lengths share a batch, so
    there is little padding), of at most `batch_size` rows and `MAX_BATCH_TOKENS` padded tokens (which
    bounds activation memory). `data_parallel`: this process's share, every world-th text."""
    encoded = sorted((tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts),
                     key=len, reverse=True)
    if data_parallel:
        rank, world = _process_group()
        encoded = encoded[rank::world]
    groups: list[list[list[int]]] = []
    for seq in encoded:
        if not groups or len(groups[-1]) == batch_size or (len(groups[-1]) + 1) * len(groups[-1][0]) > \
                MAX_BATCH_TOKENS:
            groups.append([])
        groups[-1].append(seq)
    return [pad(group) for group in groups]


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only the first process writes files when profiling runs data parallel."""
    return _process_group()[0] == 0


def _all_reduce(stats: ActivationStats) -> ActivationStats:
    """Sum every process's statistics (all processes get the total)."""
    tokens = torch.tensor([float(stats.tokens)], dtype=torch.float64)
    packed = torch.cat([stats.sum_abs, stats.sum_sq, tokens])
    dist.all_reduce(packed)
    d = len(stats.sum_abs)
    return ActivationStats(packed[:d], packed[d:2 * d], int(packed[-1]))


def pad(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of token ids with its attention mask."""
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
