"""agnostic: the activation score on generic text, LAMBADA passages (book prose, no overlap with any
evaluated task or the perplexity text), as many as all tasks' calibration samples together."""

from dietprune.methods.base import Method, Seen
from dietprune.settings import PruneSettings


def scores(seen: Seen, settings: PruneSettings):
    return {"lambada": seen.generic}


METHOD = Method(name="agnostic", summary="activation score on generic text (task-agnostic)",
                needs=frozenset({"generic"}), scores=scores)
