"""Zero-shot multiple-choice tasks (lm-evaluation-harness definitions) and their offline data."""

from dietprune.tasks.registry import (
    DEFAULT_TASKS,
    TARGET_DELIMITER,
    TASKS,
    Example,
    TaskSpec,
    get_task,
    load_examples,
    load_rows,
    split_ids,
)

__all__ = [
    "DEFAULT_TASKS",
    "TARGET_DELIMITER",
    "TASKS",
    "Example",
    "TaskSpec",
    "get_task",
    "load_examples",
    "load_rows",
    "split_ids",
]
