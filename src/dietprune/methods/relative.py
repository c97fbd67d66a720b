"""relative: per-task activation score divided by the same score on generic text (what a task uses more
than text in general), merged by --merge."""

from dietprune.methods.base import Method, Seen
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


def scores(seen: Seen, settings: PruneSettings):
    generic = seen.generic.score(settings.aggregation)
    return {task: ActivationStats.fixed(s.score(settings.aggregation) / generic)
            for task, s in seen.tasks.items()}


METHOD = Method(name="relative", summary="per-task activation score / the same on generic text",
                needs=frozenset({"tasks", "generic"}), scores=scores)
