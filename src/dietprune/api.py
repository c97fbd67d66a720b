"""What the CLI and notebooks call: profile_tasks(), prune() and their settings.

The data flows one way: load -> profile (per task, cached) -> merge -> slice -> save.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

import dietprune
from dietprune import tasks as task_registry
from dietprune.errors import DietError
from dietprune.io import atomic_dir, check_output_path
from dietprune.merge import kept_width, merge, task_votes
from dietprune.methods import (
    STRUCTURAL_METHODS,
    check_method,
    generic_texts,
    magnitude_scores,
    random_scores,
)
from dietprune.models.adapters import adapter_for
from dietprune.models.load import ModelSource, cache_root, load_config, load_model, resolve
from dietprune.profile import ActivationStats, is_main_process, profile
from dietprune.scores import load_scores, model_fingerprint, save_scores
from dietprune.slice import kept_width_step, slice_model, sliced_param_count

RECOVERIES = ("none", "lsq")


@dataclass(frozen=True)
class ProfileSettings:
    """How calibration data is drawn and profiled. Calibration text = task prompt + gold answer."""

    tasks: tuple[str, ...] = task_registry.DEFAULT_TASKS
    samples: int = 100
    seed: int = 0
    site: str = "block_output"
    max_length: int = 1024
    batch_size: int = 8
    data_source: str = "offline"


@dataclass(frozen=True)
class PruneSettings:
    """How scores become a mask: sparsity -> K (a multiple of round_to and of the head count; round_to
    None: chosen from the width, see `kept_width_step`)."""

    sparsity: float = 0.2
    round_to: int | None = None
    method: str = "diet"  # see methods.py
    merge: str = "vote"
    merge_tasks: tuple[str, ...] = ()  # the profiled tasks whose scores are merged; () = all
    aggregation: str = "l1"
    recover: str = "none"  # "lsq": closed-form refit of the kept reader weights (recover.py)
    recover_samples: int = 32  # per task: the first of the calibration samples
    recover_alpha: float = 0.01
    random_seed: int = 0  # the random method's ranking; not the calibration draw (ProfileSettings.seed)


@dataclass
class PruneResult:
    """What prune() did, as recorded in the output's dietprune.json."""

    out: Path
    record: dict = field(default_factory=dict)


def calibration_texts(task: str, settings: ProfileSettings) -> tuple[list[str], list[str]]:
    """(ids, texts) of the seeded calibration subset of `task`."""
    examples = task_registry.load_examples(task, settings.data_source)
    calib_ids, _ = task_registry.split_ids(examples, settings.samples, settings.seed)
    by_id = {ex.id: ex for ex in examples}
    return calib_ids, [by_id[i].calibration_text() for i in calib_ids]


def profile_tasks(model, tokenizer, source: ModelSource, settings: ProfileSettings,
                  use_cache: bool = True) -> tuple[dict[str, ActivationStats], dict]:
    """Per-task activation stats of the tasks' calibration subsets, and their metadata."""
    corpora = {task: calibration_texts(task, settings) for task in settings.tasks}
    return profile_corpora(model, tokenizer, source, corpora, settings, use_cache)


def profile_corpora(model, tokenizer, source: ModelSource, corpora: dict[str, tuple[list[str], list[str]]],
                    settings: ProfileSettings, use_cache: bool = True
                    ) -> tuple[dict[str, ActivationStats], dict]:
    """Activation stats per named corpus of (ids, texts); finished corpora are cached and reused."""
    adapter_for(model.config)
    fingerprint = model_fingerprint(model)
    stats, corpus_meta = {}, {}
    for name, (ids, texts) in corpora.items():
        key = _cache_key(fingerprint, name, ids, settings)
        cached = cache_root() / "scores" / f"{key}.safetensors"
        if use_cache and cached.is_file():
            stats[name] = load_scores(cached)[0][name]
        else:
            stats[name] = profile(model, tokenizer, texts, settings.site, settings.batch_size,
                                  settings.max_length, desc=f"profile {name}")
            if is_main_process():
                save_scores(cached, {name: stats[name]}, {"tasks": [name], "key": key})
        corpus_meta[name] = {"ids": ids, "tokens": stats[name].tokens}
    meta = {"model": source.name, "model_fingerprint": fingerprint,
            "hidden_size": model.config.hidden_size, "settings": asdict(settings), "tasks": corpus_meta,
            "versions": versions()}
    return stats, meta


def _cache_key(fingerprint: str, task: str, ids: list[str], settings: ProfileSettings) -> str:
    parts = [fingerprint, task, ",".join(ids), settings.site, str(settings.max_length),
             settings.data_source, dietprune.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def versions() -> dict[str, str]:
    """Library versions that determine the numbers."""
    return {"dietprune": dietprune.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def prune(model_spec: str | None, out: Path, settings: PruneSettings = PruneSettings(),
          profile_settings: ProfileSettings = ProfileSettings(), scores_path: Path | None = None,
          overwrite: bool = False) -> PruneResult:
    """Profile (or read scores), merge into one mask, slice, and save a standard HF checkpoint.

    Structural baselines (shortgpt, wanda-sp, slicegpt) instead choose their own structure (layers,
    heads and channels, rotated dims) at the parameter count the hidden-dimension slice at this
    sparsity would have."""
    started = time.perf_counter()
    check_method(settings.method)
    if settings.recover not in RECOVERIES:
        raise DietError(f"unknown recovery {settings.recover!r}; choose one of {', '.join(RECOVERIES)}")
    structural = settings.method in STRUCTURAL_METHODS
    if structural and (settings.recover != "none" or scores_path is not None):
        raise DietError(f"{settings.method} chooses its own structure, not a mask of hidden dims: "
                        "--recover and --scores do not apply")
    local = Path(model_spec).expanduser() if model_spec else None
    check_output_path(out, overwrite, protected=(local,) if local and local.exists() else ())
    source = resolve(model_spec)
    config = load_config(source)
    adapter_for(config)
    d = config.hidden_size
    step = kept_width_step(config, settings.round_to)
    k = kept_width(d, settings.sparsity, step)
    scores = load_scores(scores_path) if scores_path is not None else None
    if scores is not None and scores[1].get("hidden_size") != d:
        raise DietError(f"{scores_path} was profiled on a model of width {scores[1].get('hidden_size')}, "
                        f"not {d}; profile this model")
    model, tokenizer, source = load_model(model_spec)
    params_before = sum(p.numel() for p in model.parameters())
    if structural:
        pruned, details = _prune_structure(model, tokenizer, k, settings, profile_settings)
    else:
        pruned, details = _prune_hidden(model, tokenizer, source, k, settings, profile_settings, scores)
    del model
    record = {
        "format": "dietprune.model/1",
        "source_model": source.name,
        "hidden_size_before": d,
        "hidden_size_after": pruned.config.hidden_size,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in pruned.parameters()),
        "prune": asdict(settings),
        "kept_width_step": step,
    } | details
    with atomic_dir(out) as tmp:
        pruned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "dietprune.json").write_text(json.dumps(record, indent=2) + "\n")
    return PruneResult(out, record)


def _prune_hidden(model, tokenizer, source: ModelSource, k: int, settings: PruneSettings,
                  profile_settings: ProfileSettings, scores: tuple | None) -> tuple:
    """Scores -> one mask of k dims -> the sliced (and optionally recovered) model, and its record."""
    keep, names, matrix, meta = choose_dims(model, tokenizer, source, k, settings, profile_settings, scores)
    # recovery needs the dense model beside the sliced one; otherwise slice in the dense model's memory
    sliced = slice_model(model, keep, in_place=settings.recover == "none")
    recovery = None
    if settings.recover == "lsq":
        recovery = _recover(model, sliced, tokenizer, profile_settings, settings)
    return sliced, {"kept_dims": keep.tolist(), "profile": meta,
                    "task_agreement": agreement(matrix, keep, names), "recovery": recovery}


def choose_dims(model, tokenizer, source: ModelSource, k: int, settings: PruneSettings,
                profile_settings: ProfileSettings, scores: tuple | None = None) -> tuple:
    """The k kept hidden dims of a hidden-dim method: (keep, merged source names, their (sources, d)
    scores, profile metadata). `scores`: (stats, meta) read from a file instead of profiling."""
    stats, meta = scores or method_stats(settings, model, tokenizer, source, profile_settings)
    names = _merged_names(list(stats), settings.merge_tasks)
    matrix = torch.stack([stats[name].score(settings.aggregation) for name in names])
    return merge(matrix, k, settings.merge), names, matrix, meta


def _prune_structure(model, tokenizer, k: int, settings: PruneSettings, profile_settings: ProfileSettings
                     ) -> tuple:
    """A structural baseline on the tasks' calibration samples, to the hidden-dim slice's size."""
    from dietprune import rotate, structural

    corpora = {task: calibration_texts(task, profile_settings) for task in profile_settings.tasks}
    texts = [text for _, task_texts in corpora.values() for text in task_texts]
    target = sliced_param_count(model, k)
    method = {"shortgpt": structural.shortgpt, "wanda-sp": structural.wanda_sp,
              "slicegpt": rotate.slicegpt}[settings.method]
    pruned, structure = method(model, tokenizer, texts, target, profile_settings.batch_size,
                               profile_settings.max_length)
    meta = {"settings": asdict(profile_settings), "versions": versions(),
            "tasks": {task: {"ids": ids} for task, (ids, _) in corpora.items()}}
    return pruned, {"kept_dims": list(range(pruned.config.hidden_size)), "profile": meta,
                    "structure": structure, "recovery": None}


def method_stats(settings: PruneSettings, model, tokenizer, source: ModelSource,
                 profile_settings: ProfileSettings) -> tuple[dict[str, ActivationStats], dict]:
    """Per source (a task, a corpus, or the data-free method itself), the stats its scores come from."""
    method, aggregation = settings.method, settings.aggregation
    if method in ("diet", "relative", "act-weight"):
        stats, meta = profile_tasks(model, tokenizer, source, profile_settings)
        if method == "diet":
            return stats, meta
        if method == "relative":
            generic, generic_meta = _generic_stats(model, tokenizer, source, profile_settings)
            meta["tasks"] |= generic_meta["tasks"]
            divisor = generic["lambada"].score(aggregation)
        else:
            divisor = 1 / magnitude_scores(model)
        return {t: ActivationStats.fixed(s.score(aggregation) / divisor) for t, s in stats.items()}, meta
    if method == "agnostic":
        return _generic_stats(model, tokenizer, source, profile_settings)
    meta = {"model": source.name, "hidden_size": model.config.hidden_size, "versions": versions()}
    if method == "magnitude":
        return {"magnitude": ActivationStats.fixed(magnitude_scores(model))}, meta
    scores = random_scores(model.config.hidden_size, settings.random_seed)
    return {"random": ActivationStats.fixed(scores)}, meta


def _generic_stats(model, tokenizer, source: ModelSource, profile_settings: ProfileSettings
                   ) -> tuple[dict[str, ActivationStats], dict]:
    """Stats on generic text: as many LAMBADA passages as all tasks' calibration samples together."""
    corpus = generic_texts(profile_settings.samples * len(profile_settings.tasks))
    return profile_corpora(model, tokenizer, source, {"lambada": corpus}, profile_settings)


def _merged_names(names: list[str], merge_tasks: tuple[str, ...]) -> list[str]:
    """The sources whose scores are merged: all, or the requested subset of the profiled tasks."""
    if not merge_tasks:
        return names
    unknown = sorted(set(merge_tasks) - set(names))
    if unknown:
        raise DietError(f"cannot merge {', '.join(unknown)}: not among the profiled {', '.join(names)}")
    return [n for n in names if n in merge_tasks]


def _recover(dense, sliced, tokenizer, profile_settings: ProfileSettings, settings: PruneSettings) -> dict:
    """Refit the sliced model's readers on the first calibration samples of each task; record them."""
    from dietprune.recover import recover

    started = time.perf_counter()
    ids, texts = {}, []
    for task in profile_settings.tasks:
        task_ids, task_texts = calibration_texts(task, profile_settings)
        ids[task] = task_ids[:settings.recover_samples]
        texts += task_texts[:settings.recover_samples]
    recover(dense, sliced, tokenizer, texts, settings.recover_alpha, profile_settings.batch_size,
            profile_settings.max_length)
    seconds = round(time.perf_counter() - started, 1)
    return {"method": "lsq", "alpha": settings.recover_alpha, "seconds": seconds,
            "tasks": {task: {"ids": task_ids} for task, task_ids in ids.items()}}


def agreement(scores: torch.Tensor, keep: torch.Tensor, task_names: list[str]) -> dict[str, int]:
    """For each task, how many of its own top-K dims the global mask keeps."""
    votes = task_votes(scores, len(keep))
    return {t: int(votes[i, keep].sum()) for i, t in enumerate(task_names)}


def calibration_ids(model_path: str, settings: ProfileSettings) -> dict[str, set[str]]:
    """Ids evaluation must skip: those a pruned model records, plus the default calibration subsets
    (so a dense model and its pruned versions are evaluated on the same examples)."""
    path = Path(model_path) / "dietprune.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    ids: dict[str, set[str]] = {}
    for part in (record.get("profile"), record.get("recovery")):
        for task, meta in (part or {}).get("tasks", {}).items():
            ids.setdefault(task, set()).update(meta["ids"])
    for task in settings.tasks:
        ids.setdefault(task, set()).update(calibration_texts(task, settings)[0])
    return ids


def evaluate_model(model_spec: str | None, tasks: tuple[str, ...], limit: int | None,
                   profile_settings: ProfileSettings = ProfileSettings(), batch_size: int = 64,
                   dtype: torch.dtype | None = None, backend: str = "dietprune",
                   with_perplexity: bool = True) -> dict:
    """Zero-shot accuracy of a model on `tasks`, never on its calibration examples, and (our backend)
    perplexity on held-out generic text.

    backend "dietprune" is our fast evaluator; "lm-eval" runs lm-evaluation-harness on the same examples.
    `dtype` (default float32) is the dtype the model is loaded in, for both backends.
    """
    model, tokenizer, source = load_model(model_spec, dtype=dtype or torch.float32)
    exclude = calibration_ids(source.path, profile_settings)
    if backend == "lm-eval":
        from dietprune.lm_eval_bridge import evaluate_lm_eval

        results = evaluate_lm_eval(model, tokenizer, tasks, limit, exclude,  # its own batch size:
                                   source=profile_settings.data_source)  # it scores full-vocab logits
    else:
        from dietprune.evaluate import evaluate, perplexity

        results = evaluate(model, tokenizer, list(tasks), limit, exclude, batch_size,
                           source=profile_settings.data_source)
        if with_perplexity:
            results["perplexity"] = perplexity(model, tokenizer, progress=True)
    for task, result in results["tasks"].items():
        if set(result["ids"]) & exclude.get(task, set()):
            raise DietError(f"{task}: evaluation examples overlap the calibration examples")
    results["model"] = source.name
    return results


def run(model_spec: str | None, out: Path, settings: PruneSettings = PruneSettings(),
        profile_settings: ProfileSettings = ProfileSettings(), heldout: tuple[str, ...] = ("piqa",),
        limit: int | None = 100, dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """The main job: prune, evaluate dense and pruned on the profiled and held-out tasks, report."""
    from dietprune.report import comparison_table

    check_output_path(out, overwrite)
    tasks = tuple(profile_settings.tasks) + tuple(t for t in heldout if t not in profile_settings.tasks)
    with atomic_dir(out) as tmp:
        pruned = prune(model_spec, tmp / "pruned", settings, profile_settings)
        dense_results = evaluate_model(model_spec, tasks, limit, profile_settings, dtype=dtype)
        pruned_results = evaluate_model(str(tmp / "pruned"), tasks, limit, profile_settings, dtype=dtype)
        pruned_results["model"] = str(out / "pruned")
        summary = {"prune": {k: v for k, v in pruned.record.items() if k != "kept_dims"},
                   "dense": dense_results, "pruned": pruned_results, "heldout": list(heldout)}
        table = comparison_table(dense_results, pruned_results, heldout)
        (tmp / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
    return summary | {"table": table}
