"""The `--backend lm-eval` path: run the real lm-evaluation-harness (0.4.x) on exactly our examples.

For a built-in task we write a YAML that `include`s lm-eval's own task YAML (so its prompts, choices,
targets, preprocessing and metrics are used unchanged) and only points the data at an arrow file holding
our selected rows, in our order. Any other task is lm-eval's own (tasks/harness.py), run on the
documents our examples are (simple_evaluate's `samples`). lm-eval is imported lazily; it is an optional
dependency.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from dietprune.evaluate import dtype_name, select_examples
from dietprune.metrics import summarize, task_result
from dietprune.tasks import TASKS, Example, task_metrics
from dietprune.tasks.harness import lm_eval_tasks_dir, task_manager
from dietprune.tasks.registry import load_rows

TASK_PREFIX = "dietprune_"


def write_task(task: str, examples: Sequence[Example], source: str, out_dir: Path) -> str:
    """Write our rows for `examples` and a YAML including lm-eval's task into `out_dir`; return its name."""
    rows = load_rows(task, source)
    docs = [dict(rows[int(ex.id)]) for ex in examples]
    if task == "boolq":  # lm-eval reads the super_glue schema: label 1 = yes
        for doc in docs:
            doc.setdefault("label", int(doc["answer"]))
    data_file = out_dir / f"{task}.arrow"
    table = pa.Table.from_pylist(docs)
    with pa.ipc.new_stream(data_file, table.schema) as writer:
        writer.write_table(table)
    name = TASK_PREFIX + task
    config = {
        "include": str(lm_eval_tasks_dir() / TASKS[task].lm_eval_yaml),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data_file)}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
    }
    (out_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is valid YAML
    return name


def lm_eval_loglikelihoods(
    model, tokenizer, examples: dict[str, Sequence[Example]], batch_size: int = 8, source: str = "offline",
    include_path: tuple[str, ...] = (),
) -> tuple[dict[str, list[list[float]]], dict[str, list[bool]], dict[str, dict], dict[str, float]]:
    """Run lm-eval's HF backend on `examples` (per task, in our order).

    Returns per task: the log-likelihoods of each example's requests, whether each request's target is
    the greedy decode, lm-eval's own aggregated metrics, and the wall time of its `simple_evaluate`
    call (task building, tokenization and model calls). A built-in task is lm-eval's YAML over our rows;
    any other task is lm-eval's own, on the documents our examples are (`samples`).
    """
    lm_eval_tasks_dir()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lls, greedy, reported, seconds = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="dietprune-lm-eval-") as tmp:
        for task, exs in examples.items():
            if task in TASKS:
                name, samples = write_task(task, exs, source, Path(tmp)), None
                manager = TaskManager(include_path=tmp, include_defaults=False)
            else:
                name, samples = task, {task: [int(ex.id) for ex in exs]}
                manager = task_manager(task, source, tuple(include_path))
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, samples=samples,
                                          log_samples=True, bootstrap_iters=0)
            seconds[task] = time.perf_counter() - start
            by_doc = {s["doc_id"]: s for s in out["samples"][name]}
            ours = [by_doc[i] for i in (samples[task] if samples else range(len(exs)))]
            lls[task] = [[float(ll) for ll, _ in s["filtered_resps"]] for s in ours]
            greedy[task] = [bool(s["filtered_resps"][0][1]) for s in ours]
            metrics = task_metrics(task, source, include_path)
            reported[task] = {key.split(",")[0]: value for key, value in out["results"][name].items()
                              if key.split(",")[0] in metrics}
    return lls, greedy, reported, seconds


def evaluate_lm_eval(
    model,
    tokenizer,
    tasks: Iterable[str],
    limit: int | None,
    exclude: dict[str, set[str]] | None = None,
    batch_size: int = 8,
    source: str = "offline",
    include_path: tuple[str, ...] = (),
) -> dict:
    """`dietprune.evaluate.evaluate`, but scored by lm-eval; same result format.

    Metrics are computed from lm-eval's log-likelihoods with our `task_result`; lm-eval's own
    aggregates are kept per task under `lm_eval_reported` for cross-checking.
    """
    model.eval()
    examples = {task: select_examples(task, limit, exclude, source, include_path) for task in tasks}
    lls, greedy, reported, seconds = lm_eval_loglikelihoods(model, tokenizer, examples, batch_size, source,
                                                            include_path)
    per_task = {
        task: task_result(exs, lls[task], task_metrics(task, source, include_path), greedy[task])
        | {"seconds": seconds[task], "lm_eval_reported": reported[task]}
        for task, exs in examples.items()
    }
    settings = {
        "backend": "lm-eval",
        "limit": limit,
        "batch_size": batch_size,
        "dtype": dtype_name(next(model.parameters()).dtype),
        "source": source,
        "excluded": {task: len(ids) for task, ids in (exclude or {}).items()},
    }
    return summarize(per_task, settings)
