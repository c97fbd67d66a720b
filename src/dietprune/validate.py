"""One validation step, before any model is loaded: everything a command will read, checked in seconds
rather than found after minutes of work.

settings.py checks each option's type and range where settings are built (command line, config file or
Python). `validate` checks what the options name: the cache can be written, the device is there, every
--include-path folder and its task YAMLs, every task's data and every --calibration file (parsed, its
text field present, enough examples for the samples asked), every evaluated task, --merge-tasks against
the tasks a prune scores, and, for a model given by name, the plan of each prune (its architecture, the
kept width, the method's options) from the model's config alone. What it reads is what the work reads
next, and the large parts (each task's examples) are read once per process, so it costs little.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dietprune.calibration import generic_corpus, source_corpora, task_corpora, task_corpus
from dietprune.errors import DietError
from dietprune.io import cache_root
from dietprune.methods import get_method
from dietprune.models.load import model_config, resolve, stored_dtype
from dietprune.plan import make_plan, recovery_set, resolve_device, resolve_recover
from dietprune.settings import CalibrationSettings, EvalSettings, PruneSettings, RuntimeSettings
from dietprune.tasks import load_examples, task_metrics
from dietprune.tasks.data import lambada_passages
from dietprune.tasks.harness import check_include_paths, lm_eval_tasks_dir


def validate(model, calibration: CalibrationSettings, runtime: RuntimeSettings | None = None, *,
             prunes: Sequence[tuple[PruneSettings, CalibrationSettings]] = (),
             evaluation: EvalSettings | None = None, scores: dict | None = None) -> None:
    """Refuse, with one line, what the work would fail on later: each prune (or profile) of `prunes` (its
    settings and the calibration it profiles, planned for `model` when that is a name or None, the
    embedded default), the evaluation of `evaluation` on the tasks of `calibration`, or both (`diet
    run`, `diet sweep`). `scores`: the metadata of the score file a prune reads instead of profiling."""
    runtime = runtime or RuntimeSettings()
    _check_cache()
    resolve_device(runtime.device)
    check_include_paths(calibration.include_path)
    config = None
    for settings, calibrated in prunes:
        _check_prune(settings, calibrated, scores)
        if isinstance(model, str) or model is None:
            if config is None:
                source = resolve(model)
                config, stored = model_config(model, source.path), stored_dtype(source.path)
            make_plan(config, settings, calibrated, runtime, stored, dtype=torch.float32)  # no dtype check
    if evaluation is not None:
        _check_evaluation(evaluation, calibration)


def _check_cache() -> None:
    """The cache (profiled statistics, converted models) can be written: a prune writes to it after
    profiling."""
    root = cache_root()
    existing = next(path for path in (root, *root.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        why = "not writable" if existing.is_dir() else "a file"
        raise DietError(f"the dietprune cache {root} cannot be written ({existing} is {why}); set "
                        "DIETPRUNE_CACHE to a writable folder")


def _check_prune(settings: PruneSettings, calibration: CalibrationSettings, scores: dict | None) -> None:
    """What one prune reads: the calibration corpora (when profiling, recovering or observing a structure
    needs them; the --calibration files always), generic text, and the tasks --merge-tasks names."""
    method = get_method(settings.method)
    recover = resolve_recover(method, settings.recover)
    profiles = scores is None and "tasks" in method.needs
    corpora = []
    if profiles or recover != "none" or method.kind == "structural":
        corpora = task_corpora(calibration)
    else:
        source_corpora(calibration)  # not calibrated on, but the record pins each file
    names = [corpus.name for corpus in corpora]
    if scores is None and "generic" in method.needs:
        generic_corpus(calibration.samples * len(calibration.tasks))
    if recover != "none":
        recovery_set(settings, corpora)  # enough generic passages
    if settings.merge_tasks and method.kind == "hidden":
        if scores is None and not profiles:
            raise DietError(f"--merge-tasks does not apply to --method {method.name}: it scores no tasks")
        merged = list(scores["tasks"]) if scores is not None else names
        unknown = [task for task in settings.merge_tasks if task not in merged]
        if unknown:
            raise DietError(f"cannot merge {', '.join(unknown)}: not among the profiled {', '.join(merged)}")


def _check_evaluation(settings: EvalSettings, calibration: CalibrationSettings) -> None:
    """Every evaluated task is known and readable (its calibration examples, which evaluation skips,
    included), and what the backend needs is there."""
    tasks = tuple(dict.fromkeys(calibration.tasks + settings.heldout))
    if not tasks:
        raise DietError("nothing to evaluate: give --tasks, --heldout or both")
    if settings.backend == "lm-eval":
        lm_eval_tasks_dir()
    elif settings.perplexity:
        lambada_passages()
    for task in calibration.tasks:
        task_corpus(task, calibration)
    for task in tasks:
        load_examples(task, calibration.data_source, calibration.include_path)
        task_metrics(task, calibration.data_source, calibration.include_path)
