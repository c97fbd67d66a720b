"""Calibration: which texts run through the model, and in which batches.

Profiling, recovery and the baselines all learn from the model's activations on calibration texts:
the corpora come from here, and the sequential engine (sequential.py) runs their batches block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dietprune.errors import DietError, first_line
from dietprune.settings import CalibrationSettings
from dietprune.tasks import load_examples, split_ids
from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages
from dietprune.tasks.registry import seeded_sample
from dietprune.tasks.sources import read_source


@dataclass(frozen=True)
class Batching:
    """How calibration texts become forward passes: each text cut to `max_length` tokens, at most `rows`
    texts and `tokens` padded tokens per batch (plan.py sets `tokens` by the device)."""

    rows: int
    max_length: int
    tokens: int


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
    """Only the first process writes files when profiling or pruning runs data parallel."""
    return process_group()[0] == 0


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the data-parallel processes, in place (as it is in one process). Every
    process calls it in the same order with the same shape, on the device it computes on (NCCL reduces
    GPU tensors only): what each shard of the calibration batches adds to a statistic, made whole. A
    process that stopped (its own error said why) stops the others with one line, not a traceback."""
    if process_group()[1] > 1:
        try:
            dist.all_reduce(tensor)
        except RuntimeError as exc:  # torch.distributed's errors (a peer gone, a timeout) are RuntimeErrors
            raise DietError(f"another data-parallel process stopped (its error says why): {first_line(exc)}"
                            ) from exc
    return tensor


def token_batches(tokenizer, texts, batching: Batching, shard: bool = False) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the tokenized texts, longest first (similar lengths share a batch, so
    there is little padding), within `batching`'s limits. Texts are tokenized with the tokenizer's own
    special tokens, exactly as in evaluation. `shard`: this process's share under torch.distributed,
    every world-th text."""
    encoded = sorted((tokenizer(t, truncation=True, max_length=batching.max_length)["input_ids"]
                      for t in texts), key=len, reverse=True)
    if shard:
        rank, world = process_group()
        encoded = encoded[rank::world]
    groups: list[list[list[int]]] = []
    for seq in encoded:
        if not groups or len(groups[-1]) == batching.rows or \
                (len(groups[-1]) + 1) * len(groups[-1][0]) > batching.tokens:
            groups.append([])
        groups[-1].append(seq)
    return [pad(group) for group in groups]


def corpus_batches(tokenizer, corpora: list[Corpus], batching: Batching, shard: bool = False
                   ) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Every corpus's batches (a batch holds one corpus's texts), and the corpus index of each. `shard`:
    this process's share under torch.distributed, which must not be empty (every process then gives the
    same error, none waits for the others)."""
    world = process_group()[1]
    if shard and corpora and world > (most := max(len(corpus.texts) for corpus in corpora)):
        raise DietError(f"{world} processes each take a share of the calibration texts, but the largest "
                        f"calibration set holds {most}; run at most {most} process{'es' * (most > 1)}")
    batches, groups = [], []
    for index, corpus in enumerate(corpora):
        mine = token_batches(tokenizer, corpus.texts, batching, shard)
        batches += mine
        groups += [index] * len(mine)
    return batches, groups


def pad(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of token ids with its attention mask."""
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
