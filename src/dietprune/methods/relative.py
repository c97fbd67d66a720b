"""relative: per-task activation score divided by the same score on generic text (what a task uses more
than text in general), merged by --merge."""

from dietprune.methods.base import Context, Method
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


def scores(context: Context, settings: PruneSettings):
    tasks = context.task_stats()
    generic = context.generic_stats().score(settings.aggregation)
    return {task: ActivationStats.fixed(s.score(settings.aggregation) / generic) for task, s in tasks.items()}


METHOD = Method(name="relative", summary="per-task activation score / the same on generic text",
                scores=scores)
