"""Tasks: the built-in zero-shot tasks (lm-evaluation-harness definitions, offline data) and any
lm-eval task or user task YAML by name (harness.py), both as Examples."""

from __future__ import annotations

from dietprune.tasks import harness, registry
from dietprune.tasks.registry import DEFAULT_TASKS, TASKS, Example, split_ids


def load_examples(task: str, source: str = "offline", include_path: tuple[str, ...] = ()) -> list[Example]:
    """The evaluation split of `task` as Examples in file order: a built-in task's validation rows, else
    the documents lm-eval's definition of it evaluates."""
    if task in TASKS:
        return registry.load_examples(task, source)
    return harness.load_examples(task, source, tuple(include_path))


def task_metrics(task: str, source: str = "offline", include_path: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The metrics lm-eval reports for `task` (those dietprune computes)."""
    if task in TASKS:
        return TASKS[task].metrics
    return harness.metrics(task, source, tuple(include_path))


__all__ = ["DEFAULT_TASKS", "TASKS", "Example", "load_examples", "split_ids", "task_metrics"]
