"""Zero-shot evaluation on tasks, never on calibration examples, and perplexity on held-out text."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch

from dietprune.calibration import task_corpus
from dietprune.engine import continuation_logprobs, loglikelihoods
from dietprune.metrics import summarize, task_result
from dietprune.settings import CalibrationSettings
from dietprune.tasks import Example, load_examples, task_metrics
from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages


def excluded_ids(record: dict | None, settings: CalibrationSettings) -> dict[str, set[str]]:
    """Ids evaluation must skip: every calibration sample a pruned model records (in its dietprune.json
    record), plus the default calibration subsets of the tasks (so a dense model and its pruned versions
    are evaluated on the same examples)."""
    ids: dict[str, set[str]] = {}
    for task, meta in (record or {}).get("calibration", {}).items():
        ids.setdefault(task, set()).update(meta["ids"])
    for task in settings.tasks:
        ids.setdefault(task, set()).update(task_corpus(task, settings).ids)
    return ids


def score_examples(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 64, dtype=None, progress: bool = False
) -> list[list[float]]:
    """Per example, the log-likelihood of each choice."""
    requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations, strict=True)]
    desc = examples[0].task if examples else "loglikelihood"
    flat = loglikelihoods(model, tokenizer, requests, batch_size, dtype, progress, desc)[0]
    out, start = [], 0
    for ex in examples:
        out.append(flat[start : start + len(ex.contexts)])
        start += len(ex.contexts)
    return out


def select_examples(task: str, limit: int | None, exclude: dict[str, set[str]] | None = None,
                    source: str = "offline", include_path: tuple[str, ...] = ()) -> list[Example]:
    """The first `limit` examples of `task` (file order) whose ids are not in `exclude[task]`."""
    skip = (exclude or {}).get(task, set())
    kept = [ex for ex in load_examples(task, source, include_path) if ex.id not in skip]
    return kept if limit is None else kept[:limit]


def dtype_name(dtype: torch.dtype) -> str:
    """How results record a dtype: "float32", "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def evaluate(
    model,
    tokenizer,
    tasks: Iterable[str],
    limit: int | None,
    exclude: dict[str, set[str]] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    source: str = "offline",
    progress: bool = True,
    include_path: tuple[str, ...] = (),
) -> dict:
    """Zero-shot accuracy on `tasks`: the first `limit` examples per task whose ids are not excluded.

    Returns a JSON-able dict: `tasks[name]` = {acc, acc_stderr, acc_norm, acc_norm_stderr, n, metrics
    (those lm-eval reports; acc_norm is always computed), ids, preds, preds_norm, correct, correct_norm,
    seconds} (a loglikelihood task: acc, perplexity, correct), `average` (see `summarize`), `settings`.
    """
    model.eval()
    per_task = {}
    for task in tasks:
        examples = select_examples(task, limit, exclude, source, include_path)
        metrics = task_metrics(task, source, include_path)
        start = time.perf_counter()
        if examples and examples[0].kind == "loglikelihood":
            requests = [(ex.contexts[0], ex.continuations[0]) for ex in examples]
            lls, greedy = loglikelihoods(model, tokenizer, requests, batch_size, dtype, progress, task)
            result = task_result(examples, [[ll] for ll in lls], metrics, greedy)
        else:
            result = task_result(examples, score_examples(model, tokenizer, examples, batch_size, dtype,
                                                          progress), metrics)
        per_task[task] = result | {"seconds": time.perf_counter() - start}
    settings = {
        "backend": "dietprune",
        "limit": limit,
        "batch_size": batch_size,
        "dtype": dtype_name(dtype or next(model.parameters()).dtype),
        "source": source,
        "excluded": {task: len(ids) for task, ids in (exclude or {}).items()},
    }
    return summarize(per_task, settings)


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str] | None = None,
    passages: int = PERPLEXITY_PASSAGES,
    max_length: int = 512,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Token-level perplexity exp(mean NLL) over `texts`, each truncated to `max_length` tokens.

    The default corpus is offline and held out from all calibration: the last `passages` (at most
    `PERPLEXITY_PASSAGES`) LAMBADA test passages (book prose; see `lambada_passages`). Each text is
    encoded with the tokenizer's default special tokens and scored on its own; the first token is never
    predicted.
    """
    started = time.perf_counter()
    corpus = "lambada" if texts is None else "custom"
    texts = [t for _, t in lambada_passages()[-min(passages, PERPLEXITY_PASSAGES):]] if texts is None \
        else list(texts)
    ids = [t[:max_length] for t in tokenizer(texts)["input_ids"]]
    total = sum(continuation_logprobs(model, tokenizer, ids, batch_size, dtype, progress, "perplexity"))
    tokens = sum(len(t) - 1 for t in ids)
    return {"perplexity": math.exp(-total / tokens), "corpus": corpus, "texts": len(texts), "tokens": tokens,
            "max_length": max_length, "seconds": round(time.perf_counter() - started, 1)}
