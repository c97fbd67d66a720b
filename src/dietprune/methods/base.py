"""What a pruning method declares. A method never runs its own forward loop: it says what it observes,
and the sequential engine (sequential.py) feeds it in one pass over the blocks.

  hidden      scores the hidden dims, one score vector per source (a task, generic text, or the method
              itself), from what it `needs`: "tasks" (each task's activation statistics), "generic" (the
              same on generic text), "magnitude" (each dim's share of the weights' norms), "grams"
              (the readers' forms and each task's Gram matrices at every norm, methods/obs.py). `merge`
              turns the scores into exactly K kept dims, and one slicing (and optional recovery) path
              gives a checkpoint of the same size for every such method;
  structural  chooses its own structure (layers, heads and channels, rotated dims) at the parameter
              count the hidden-dim slice would have: an `observer` taps the calibration pass, then
              `edit` turns what it saw into the pruned model's config and tensors (assemble.py).
Each method also names its sweep variants: settings overrides (option names as in a config file) that
`diet sweep --methods` accepts beside the method's own name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from dietprune.assemble import Edit, applied
from dietprune.calibration import Batching, token_batches
from dietprune.errors import DietError
from dietprune.profile import ActivationStats
from dietprune.sequential import Observer, Weights, capture, observe
from dietprune.settings import PruneSettings

NEEDS = ("tasks", "generic", "magnitude", "grams")


@dataclass
class Seen:
    """What a hidden-dim method scores with: the model's width and the K dims the mask keeps, per task
    the activation statistics of its calibration samples, the same on generic text, each dim's share of
    the weights' norms, and the readers' forms (sites, d, d) with each task's Gram matrices at the same
    sites (methods/obs.py)."""

    width: int
    kept: int
    tasks: dict[str, ActivationStats] = field(default_factory=dict)
    generic: ActivationStats | None = None
    magnitude: torch.Tensor | None = None
    forms: torch.Tensor | None = None
    grams: dict[str, torch.Tensor] = field(default_factory=dict)


Scorer = Callable[[Seen, PruneSettings], dict[str, ActivationStats]]
Editor = Callable[[PreTrainedModel, Observer, int, bool], tuple[Edit, dict]]


@dataclass(frozen=True)
class Method:
    """One pruning method: `needs` and `scores` for a hidden-dim method; for a structural one,
    `observer(model, target params)` (which refuses a target it cannot meet before any work) and
    `edit(model, observer, target params, in place)`."""

    name: str
    summary: str
    needs: frozenset[str] = frozenset()
    scores: Scorer | None = None
    observer: Callable[[PreTrainedModel, int], Observer] | None = None
    edit: Editor | None = None
    variants: dict[str, dict] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "hidden" if self.scores is not None else "structural"


def observed(observer: Observer, weights: Weights, tokenizer, texts: list[str], batching: Batching,
             desc: str) -> tuple[Observer, int]:
    """`observer` after one pass of `texts` through the model, and the number of real tokens."""
    stream = capture(weights, token_batches(tokenizer, texts, batching))
    observe(weights, stream, [observer], desc)
    return observer, require_tokens(stream.tokens())


def prune_structure(method: Method, model: PreTrainedModel, tokenizer, texts: list[str], target: int,
                    batching: Batching, in_place: bool = False) -> tuple[PreTrainedModel, dict]:
    """A structural method applied to a model in memory: (the pruned model, its record)."""
    weights = Weights.of(model)
    observer, _ = observed(method.observer(model, target), weights, tokenizer, texts, batching, method.name)
    edit, record = method.edit(model, observer, target, in_place)
    return applied(model, edit, method.name), record


def nearest_units(excess: int, unit: int) -> int:
    """The count n >= 0 for which n * unit is nearest to `excess` (ties: the smaller n)."""
    return max(0, (2 * excess + unit - 1) // (2 * unit))


def require_tokens(tokens: int) -> int:
    if not tokens:
        raise DietError("no calibration tokens; give at least one non-empty text")
    return tokens
