"""Calibration: which texts run through the model, in which batches, and the one hooked forward loop.

Profiling, recovery, the rotation and the structural baselines all learn from the same thing: the
model's activations on calibration texts. They differ only in what they collect, so they share
`ForwardPass`: hooks receive the activations of real tokens only (padding removed here, in one place),
and a hook may end a pass early once it has what it needs (`StopForward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dietprune.device import input_device
from dietprune.errors import DietError
from dietprune.progress import progress
from dietprune.settings import CalibrationSettings
from dietprune.tasks import load_examples, split_ids
from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages
from dietprune.tasks.registry import seeded_sample
from dietprune.tasks.sources import read_source

MAX_BATCH_TOKENS = 4096  # padded tokens per calibration forward pass: bounds activation memory


@dataclass(frozen=True)
class Corpus:
    """Named calibration texts with the ids that identify them in their source (recorded, and
    excluded from evaluation), and for the user's own data where it came from."""

    name: str
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    source: dict | None = None

    def head(self, n: int) -> Corpus:
        """The first n samples (a seeded sample's prefix is itself a random sample)."""
        return Corpus(self.name, self.ids[:n], self.texts[:n], self.source)


def task_corpus(task: str, settings: CalibrationSettings) -> Corpus:
    """The seeded calibration subset of `task`: each example's prompt followed by its gold answer."""
    examples = load_examples(task, settings.data_source, settings.include_path)
    ids, _ = split_ids(examples, settings.samples, settings.seed)
    by_id = {ex.id: ex for ex in examples}
    return Corpus(task, tuple(ids), tuple(by_id[i].calibration_text() for i in ids))


def source_corpora(settings: CalibrationSettings) -> list[Corpus]:
    """The user's own calibration data: per task of each source, a seeded sample of `samples` rows
    (all of them when it has fewer: its rows are never evaluated, so none need to stay out)."""
    corpora = []
    for spec in settings.calibration:
        for task in read_source(spec, settings.text_field, settings.task_field):
            count = min(settings.samples, len(task.rows))
            picked = [task.rows[i] for i in seeded_sample(len(task.rows), count, settings.seed)]
            corpora.append(Corpus(task.name, tuple(i for i, _ in picked), tuple(t for _, t in picked),
                                  task.source | {"rows": len(task.rows)}))
    return corpora


def task_corpora(settings: CalibrationSettings) -> list[Corpus]:
    """Every corpus the settings calibrate on: the tasks' samples, then the user's own data."""
    corpora = [task_corpus(task, settings) for task in settings.tasks] + source_corpora(settings)
    if not corpora:
        raise DietError("nothing to calibrate on: give --tasks, --calibration or both")
    names = [corpus.name for corpus in corpora]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise DietError(f"two calibration corpora are named {', '.join(twice)}; rename a file or task")
    return corpora


def generic_corpus(n: int) -> Corpus:
    """The first n LAMBADA test passages: book prose unrelated to every task (see `lambada_passages`)."""
    passages = lambada_passages()
    if n > len(passages) - PERPLEXITY_PASSAGES:
        raise DietError(f"the generic corpus has {len(passages) - PERPLEXITY_PASSAGES} calibration passages, "
                        f"not {n}; ask for fewer samples")
    return Corpus("lambada", tuple(i for i, _ in passages[:n]), tuple(t for _, t in passages[:n]))


def process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Only the first process writes files when profiling runs data parallel."""
    return process_group()[0] == 0


def token_batches(tokenizer, texts, batch_size: int = 8, max_length: int = 1024, shard: bool = False
            ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the tokenized texts, longest first (similar lengths share a batch, so
    there is little padding), of at most `batch_size` rows and `MAX_BATCH_TOKENS` padded tokens. Texts
    are tokenized with the tokenizer's own special tokens, exactly as in evaluation. `shard`: this
    process's share under torch.distributed, every world-th text."""
    encoded = sorted((tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts),
                     key=len, reverse=True)
    if shard:
        rank, world = process_group()
        encoded = encoded[rank::world]
    groups: list[list[list[int]]] = []
    for seq in encoded:
        if not groups or len(groups[-1]) == batch_size or \
                (len(groups[-1]) + 1) * len(groups[-1][0]) > MAX_BATCH_TOKENS:
            groups.append([])
        groups[-1].append(seq)
    return [pad(group) for group in groups]


def pad(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of token ids with its attention mask."""
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class StopForward(Exception):
    """Raised by a hook to end the running forward pass: what the pass was for is collected."""


class ForwardPass:
    """Run calibration batches through a model's decoder (never the LM head) with hooks attached.

    `on_input(module, fn)` calls fn(x) with the module's first input, `on_output(module, fn)` with its
    output (the first element of a tuple); x has one row per real token: (tokens, ...) with padding
    removed. `on_call(module, fn)` calls fn(args, kwargs) with the raw inputs, padding included.
    Batches go to the device of the model's input embedding.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: list[tuple[nn.Module, str, Callable]] = []
        self._mask: torch.Tensor | None = None  # (batch, seq) bool: the running batch's real tokens

    def on_input(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def hook(_module, args, kwargs):
            fn((args[0] if args else kwargs["hidden_states"])[self._mask])
        self._hooks.append((module, "pre", hook))

    def on_output(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def hook(_module, _args, output):
            fn((output[0] if isinstance(output, tuple) else output)[self._mask])
        self._hooks.append((module, "post", hook))

    def on_call(self, module: nn.Module, fn: Callable[[tuple, dict], None]) -> None:
        self._hooks.append((module, "pre", lambda _module, args, kwargs: fn(args, kwargs)))

    @torch.inference_mode()
    def run(self, batches: list[dict[str, torch.Tensor]], desc: str = "calibrate") -> int:
        """Run every batch; returns the number of real (non-padding) tokens."""
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) if when == "pre"
                   else module.register_forward_hook(hook) for module, when, hook in self._hooks]
        device, tokens = input_device(self.model), 0
        decoder = self.model.get_decoder()
        try:
            for batch in progress(batches, desc=desc, unit="batch"):
                batch = {key: value.to(device) for key, value in batch.items()}
                self._mask = batch["attention_mask"].bool()
                with contextlib.suppress(StopForward):
                    decoder(**batch, use_cache=False)
                tokens += int(self._mask.sum())
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None
        return tokens
