"""What a pruning method declares, and what the hidden-dim methods are given to score with.

A method is one of two kinds:
  hidden      scores the hidden dims, one score vector per source (a task, a corpus, or the method
              itself); `merge` turns them into exactly K kept dims and the same slicing (and optional
              recovery) path gives a checkpoint of the same size for every such method;
  structural  chooses its own structure (layers, heads and channels, rotated dims) on the tasks'
              calibration texts, at the parameter count the hidden-dim slice would have.
Each method also names its sweep variants: settings overrides (option names as in a config file) that
`diet sweep --methods` accepts beside the method's own name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from transformers import PreTrainedModel

from dietprune.calibration import Corpus, generic_corpus, task_corpora
from dietprune.errors import DietError
from dietprune.profile import ActivationStats
from dietprune.scores import model_fingerprint, profile_corpora
from dietprune.settings import CalibrationSettings, PruneSettings


@dataclass
class Context:
    """A loaded model with its calibration settings; profiles corpora (cached on disk) and records
    every calibration sample a method used, so evaluation can exclude them."""

    model: PreTrainedModel
    tokenizer: object
    settings: CalibrationSettings
    used: dict[str, dict] = field(default_factory=dict)  # corpus name -> {"ids": [...], "tokens": n}

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def profile(self, corpora: list[Corpus]) -> dict[str, ActivationStats]:
        stats = profile_corpora(self.model, self.tokenizer, self.fingerprint, corpora, self.settings)
        for corpus in corpora:
            self.used[corpus.name] = {"ids": list(corpus.ids), "tokens": stats[corpus.name].tokens} | (
                {"source": corpus.source} if corpus.source else {})
        return stats

    def task_stats(self) -> dict[str, ActivationStats]:
        """Per task, the activation stats of its calibration samples."""
        return self.profile(task_corpora(self.settings))

    def generic_stats(self) -> ActivationStats:
        """Stats on generic text: as many LAMBADA passages as all tasks' calibration samples together."""
        corpus = generic_corpus(self.settings.samples * len(self.settings.tasks))
        return self.profile([corpus])[corpus.name]

    def task_texts(self) -> list[str]:
        """Every task's calibration texts, task after task (recorded as used)."""
        texts = []
        for corpus in task_corpora(self.settings):
            self.used[corpus.name] = {"ids": list(corpus.ids)} | ({"source": corpus.source} if corpus.source
                                                                   else {})
            texts += corpus.texts
        return texts


Scorer = Callable[[Context, PruneSettings], dict[str, ActivationStats]]
Builder = Callable[..., tuple[PreTrainedModel, dict]]  # (model, tokenizer, texts, target_params, ...)


@dataclass(frozen=True)
class Method:
    """One pruning method: `scores` for a hidden-dim method, `build` for a structural one. `consumes`:
    `build` changes the model it is given (it is given a copy unless pruning may reuse the memory)."""

    name: str
    summary: str
    scores: Scorer | None = None
    build: Builder | None = None
    consumes: bool = False
    variants: dict[str, dict] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "hidden" if self.scores is not None else "structural"


def nearest_units(excess: int, unit: int) -> int:
    """The count n >= 0 for which n * unit is nearest to `excess` (ties: the smaller n)."""
    return max(0, (2 * excess + unit - 1) // (2 * unit))


def require_tokens(tokens: int) -> int:
    if not tokens:
        raise DietError("no calibration tokens; give at least one non-empty text")
    return tokens
