"""act-weight: per-task activation score x the data-free magnitude score (Wanda-style: a dim matters
if it is both active and heavily weighted), merged by --merge."""

from dietprune.methods.base import Context, Method
from dietprune.methods.magnitude import magnitude_scores
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


def scores(context: Context, settings: PruneSettings):
    weight = magnitude_scores(context.model)
    return {task: ActivationStats.fixed(s.score(settings.aggregation) * weight)
            for task, s in context.task_stats().items()}


METHOD = Method(name="act-weight", summary="per-task activation score x weight magnitude", scores=scores)
