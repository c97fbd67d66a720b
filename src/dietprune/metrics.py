"""Metrics and statistics: accuracies as lm-eval defines them, standard errors, paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dietprune.errors import DietError
from dietprune.tasks import Example


def stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def predictions(example: Example, lls: Sequence[float]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of the log-likelihoods, and of log-likelihood / choice length in
    characters (lm-eval's acc_norm: `len(choice)` without the target delimiter; first index on ties)."""
    lengths = np.array([float(len(c)) for c in example.choices])
    return int(np.argmax(lls)), int(np.argmax(np.asarray(lls) / lengths))


def task_result(examples: Sequence[Example], lls: Sequence[Sequence[float]], metrics: Sequence[str],
                greedy: Sequence[bool] | None = None) -> dict:
    """One task's metrics (those lm-eval reports are listed under "metrics") with per-example
    predictions and correctness ("correct", "correct_norm": 1.0 or 0.0 per example, for paired
    statistics). Multiple choice: acc and acc_norm. A loglikelihood task (one request per example,
    `greedy` whether its target is the greedy decode): acc = the share of greedy targets, and
    perplexity = exp(-mean log-likelihood) over examples, as lm-eval aggregates it."""
    ids = [ex.id for ex in examples]
    if examples and examples[0].kind == "loglikelihood":
        correct = [float(g) for g in greedy]
        total = [ll[0] for ll in lls]
        return {"acc": float(np.mean(correct)), "acc_stderr": stderr(correct), "n": len(examples),
                "perplexity": math.exp(-float(np.mean(total))), "metrics": list(metrics), "ids": ids,
                "loglikelihoods": total, "correct": correct}
    preds = [predictions(ex, ll) for ex, ll in zip(examples, lls, strict=True)]
    acc = [float(p == ex.gold) for (p, _), ex in zip(preds, examples, strict=True)]
    acc_norm = [float(q == ex.gold) for (_, q), ex in zip(preds, examples, strict=True)]
    return {
        "acc": float(np.mean(acc)) if acc else None,
        "acc_stderr": stderr(acc),
        "acc_norm": float(np.mean(acc_norm)) if acc_norm else None,
        "acc_norm_stderr": stderr(acc_norm),
        "n": len(examples),
        "metrics": list(metrics),
        "ids": ids,
        "preds": [p for p, _ in preds],
        "preds_norm": [q for _, q in preds],
        "correct": acc,
        "correct_norm": acc_norm,
    }


def headline(result: dict) -> float | None:
    """A task's headline score: acc_norm where lm-eval reports it, else acc."""
    return result["acc_norm"] if "acc_norm" in result["metrics"] else result["acc"]


def summarize(per_task: dict[str, dict], settings: dict) -> dict:
    """Full results: per-task metrics, averages over tasks, settings.

    `average.acc` is the mean accuracy over tasks; `average.score` the mean of each task's headline
    metric (acc_norm for HellaSwag, ARC, OpenBookQA and PIQA, acc for BoolQ, RTE and WinoGrande).
    """
    done = [r for r in per_task.values() if r["n"]]
    mean = (lambda xs: float(np.mean(xs))) if done else (lambda xs: None)
    average = {"acc": mean([r["acc"] for r in done]), "score": mean([headline(r) for r in done])}
    return {"tasks": per_task, "average": average, "settings": settings}


METRICS = ("acc", "score")  # score: each task's headline metric, acc_norm where lm-eval reports it


def metric_key(result: dict, metric: str) -> str:
    """The key of `metric` in one task's result: "acc", or "acc_norm" for the score of a task whose
    lm-eval definition reports it."""
    return "acc_norm" if metric == "score" and "acc_norm" in result.get("metrics", ()) else "acc"


def average(cell: dict, tasks: list[str], metric: str = "acc") -> float:
    """Mean of `metric` over `tasks` (NaN for a cell whose method did not apply)."""
    if "error" in cell:
        return math.nan
    return sum(cell["tasks"][t][metric_key(cell["tasks"][t], metric)] for t in tasks) / len(tasks)


def average_stderr(cell: dict, tasks: list[str], metric: str = "acc") -> float:
    """Standard error of the average over tasks (tasks' examples independent)."""
    keys = [metric_key(cell["tasks"][t], metric) + "_stderr" for t in tasks]
    return math.sqrt(sum(cell["tasks"][t][key] ** 2 for t, key in zip(tasks, keys, strict=True))) / len(tasks)


def correct(result: dict, metric: str = "acc") -> np.ndarray:
    """Per example of one task's result: 1.0 where the `metric` prediction is right (or, for a seed
    mean, the share of seeds that are right)."""
    return np.asarray(result["correct_norm" if metric_key(result, metric) == "acc_norm" else "correct"],
                      dtype=float)


def seed_mean(cells: list[dict], tasks: list[str], metric: str = "acc") -> dict:
    """One cell for the mean of several seeds' cells on the same examples: per example, the share of
    seeds that are right under `metric`; its value is the mean over seeds, its standard error that of
    the per-example shares (stored under "acc": the merged cell stands for this one metric)."""
    merged = {}
    for task in tasks:
        ids = cells[0]["tasks"][task]["ids"]
        if any(c["tasks"][task]["ids"] != ids for c in cells):
            raise DietError(f"{task}: the seeds were evaluated on different examples")
        share = np.mean([correct(c["tasks"][task], metric) for c in cells], axis=0)
        merged[task] = {"ids": ids, "correct": share.tolist(), "acc": float(share.mean()),
                        "acc_stderr": float(share.std(ddof=1) / math.sqrt(len(share))), "metrics": ["acc"]}
    return {"tasks": merged, "prune": cells[0]["prune"]}


def paired_difference(cell: dict, reference: dict, tasks: list[str], metric: str = "acc"
                      ) -> tuple[float, float]:
    """Average over tasks of (cell - reference) in `metric` on the same examples, and its standard
    error: per-example differences within a task (paired), tasks independent."""
    means, variances = [], []
    for task in tasks:
        mine, theirs = cell["tasks"][task], reference["tasks"][task]
        if mine["ids"] != theirs["ids"]:
            raise DietError(f"{task}: the two cells were evaluated on different examples")
        diff = correct(mine, metric) - correct(theirs, metric)
        means.append(diff.mean())
        variances.append(diff.var(ddof=1) / len(diff))
    return float(np.mean(means)), math.sqrt(sum(variances)) / len(tasks)
