"""agnostic: the activation score on generic text, LAMBADA passages (book prose, no overlap with any
evaluated task or the perplexity text), as many as all tasks' calibration samples together."""

from dietprune.methods.base import Context, Method
from dietprune.settings import PruneSettings


def scores(context: Context, settings: PruneSettings):
    return {"lambada": context.generic_stats()}


METHOD = Method(name="agnostic", summary="activation score on generic text (task-agnostic)", scores=scores)
