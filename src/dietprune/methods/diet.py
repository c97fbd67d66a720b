"""DIET: per-task mean |activation| of each hidden dim on the tasks' calibration samples, merged into one
mask by --merge (majority vote by default).

Its sweep variants are the ablations that decide what matters: the merge, the aggregation, the
activation site, one task alone, and the calibration size."""

from dietprune.methods.base import Method, Seen
from dietprune.settings import DEFAULT_TASKS, PruneSettings


def scores(seen: Seen, settings: PruneSettings):
    return seen.tasks


METHOD = Method(
    name="diet",
    summary="per-task activation scores on the tasks' calibration samples, merged by --merge",
    needs=frozenset({"tasks"}),
    scores=scores,
    variants={
        "mean": {"merge": "mean"},
        "weighted": {"merge": "weighted"},
        "l2": {"aggregation": "l2"},
        "norm-site": {"site": "norm_output"},
        **{f"only-{task}": {"merge_tasks": (task,)} for task in DEFAULT_TASKS},
        **{f"samples-{n}": {"samples": n} for n in (10, 50, 200)},
    },
)
