"""act-weight: per-task activation score x the data-free magnitude score (Wanda-style: a dim matters
if it is both active and heavily weighted), merged by --merge."""

from dietprune.methods.base import Method, Seen
from dietprune.profile import ActivationStats
from dietprune.settings import PruneSettings


def scores(seen: Seen, settings: PruneSettings):
    return {task: ActivationStats.fixed(s.score(settings.aggregation) * seen.magnitude)
            for task, s in seen.tasks.items()}


METHOD = Method(name="act-weight", summary="per-task activation score x weight magnitude",
                needs=frozenset({"tasks", "magnitude"}), scores=scores)
