"""What the CLI and notebooks call: load, prune (in memory), save, evaluate, run.

The data flows one way: load -> profile (per task, cached) -> merge -> slice (-> recover) -> save ->
evaluate -> report. `prune` takes a model name or an already loaded model (what a notebook holds), so
`run` and `sweep` load the dense model once and every step reuses it:

    import dietprune
    pruned = dietprune.prune("gemma-3-270m", sparsity=0.3, recover="lsq")
    dietprune.save(pruned, "out/p30")
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel

from dietprune.calibration import task_corpora
from dietprune.device import compute_dtype, full_state_dict, place_like, resolve_device
from dietprune.errors import DietError
from dietprune.evaluate import dtype_name, excluded_ids, perplexity
from dietprune.evaluate import evaluate as evaluate_tasks
from dietprune.io import atomic_dir, check_output_path, read_json
from dietprune.merge import agreement, kept_width, kept_width_step, merge
from dietprune.methods import Context, get_method
from dietprune.models.adapters import adapter_for
from dietprune.models.edit import count_params, rebuild
from dietprune.models.load import load_model, stored_dtype
from dietprune.profile import ActivationStats
from dietprune.report import run_plot, run_report
from dietprune.scores import load_scores
from dietprune.settings import (
    CalibrationSettings,
    EvalSettings,
    PruneSettings,
    RuntimeSettings,
    Settings,
    build,
    route,
)
from dietprune.slice import slice_model, sliced_param_count
from dietprune.tasks.sources import pinned
from dietprune.version import __version__

RECORD = "dietprune.json"
FORMAT = "dietprune.model/2"


@dataclass
class Loaded:
    """A model with its tokenizer, where it came from, the dtype its checkpoint stores, and the record
    of a model dietprune pruned."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    stored_dtype: torch.dtype
    record: dict | None = None


@dataclass
class Pruned:
    """A pruned model in memory, what was done to it (saved as dietprune.json), and the dtype it is
    saved in."""

    model: PreTrainedModel
    tokenizer: object
    record: dict
    save_dtype: torch.dtype


def versions() -> dict[str, str]:
    """Library versions that determine the numbers."""
    return {"dietprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def load(spec: str | None = None, runtime: RuntimeSettings | None = None) -> Loaded:
    """Load a model directory, .gguf file, hub id or embedded name (default: the embedded Gemma-3 270M)."""
    runtime = runtime or RuntimeSettings()
    device = resolve_device(runtime.device)
    dtype = compute_dtype(runtime.dtype, device)
    model, tokenizer, source = load_model(spec, dtype, device, runtime.device_map)
    return Loaded(model, tokenizer, source.name, stored_dtype(source.path),
                  read_record(Path(source.path)))


def read_record(model_dir: Path) -> dict | None:
    """The dietprune.json of a pruned model directory, if there is one."""
    path = model_dir / RECORD
    return read_json(path, "record of a pruned model") if path.is_file() else None


def profile(model: str | PreTrainedModel | Loaded | None = None, tokenizer=None, *,
            calibration: CalibrationSettings | None = None, runtime: RuntimeSettings | None = None,
            **options) -> tuple[dict[str, ActivationStats], dict]:
    """Per task, the activation statistics of its calibration samples, and the provenance a score file
    records with them (model, fingerprint, settings, the sample ids)."""
    calibration, runtime = settings_for(options, CalibrationSettings, RuntimeSettings,
                                        given=(calibration, runtime), command="profile")
    calibration = calibration.for_recovery(PruneSettings().recover)  # the site `diet prune` would use
    loaded = _loaded(model, tokenizer, runtime)
    context = Context(loaded.model, loaded.tokenizer, calibration)
    stats = context.task_stats()
    meta = {"model": loaded.name, "model_fingerprint": context.fingerprint,
            "hidden_size": loaded.model.config.hidden_size, "settings": calibration.to_dict(),
            "tasks": context.used, "versions": versions()}
    return stats, meta


def _loaded(model: str | PreTrainedModel | Loaded | None, tokenizer, runtime: RuntimeSettings) -> Loaded:
    if isinstance(model, Loaded):
        return model
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise DietError("a loaded model needs its tokenizer: prune(model, tokenizer, ...)")
        name = getattr(model.config, "_name_or_path", "") or "in-memory"
        return Loaded(model.eval(), tokenizer, name, model.dtype)
    return load(model, runtime)


def settings_for(options: dict, *groups: type[Settings], given: tuple[Settings | None, ...] = (),
                 command: str = "prune") -> list[Settings]:
    """Instances of `groups`: each from the given instance (or the defaults) with `options` (flat option
    names, as in a config file) applied on top."""
    routed = route(options, groups, command)
    out = []
    for group, instance in zip(groups, list(given) + [None] * (len(groups) - len(given)), strict=True):
        base = instance.to_dict() if instance is not None else {}
        out.append(build(group, base | routed[group]))
    return out


def prune(model: str | PreTrainedModel | Loaded | None = None, tokenizer=None, *,
          settings: PruneSettings | None = None, calibration: CalibrationSettings | None = None,
          runtime: RuntimeSettings | None = None, scores: Path | None = None, in_place: bool = False,
          **options) -> Pruned:
    """Prune `model` (a name, or a loaded model and its tokenizer) and return the smaller model.

    A hidden-dim method (DIET by default) profiles or reads `scores`, merges them into one mask of
    exactly K dims, slices, and optionally recovers; a structural method (shortgpt, wanda-sp,
    slicegpt) chooses its own structure at the parameter count of that slice. `options` are flat option
    names, as in a config file (`sparsity=0.3`). `in_place` lets pruning reuse the given model's memory
    (the model given is destroyed); otherwise it stays as it was."""
    started = time.perf_counter()
    settings, calibration, runtime = settings_for(options, PruneSettings, CalibrationSettings,
                                                  RuntimeSettings, given=(settings, calibration, runtime))
    method = get_method(settings.method)
    if settings.recover == "auto":  # the default, chosen by the rule in docs/RESULTS.md
        settings = replace(settings, recover="full" if method.kind == "hidden" else "none")
    calibration = calibration.for_recovery(settings.recover)
    if method.kind == "structural" and (settings.recover != "none" or scores is not None):
        raise DietError(f"{method.name} chooses its own structure, not a mask of hidden dims: "
                        "--recover and --scores do not apply")
    loaded = _loaded(model, tokenizer, runtime)
    dense = loaded.model
    config = dense.config
    adapter_for(config)
    d = config.hidden_size
    step = kept_width_step(config, settings.round_to)
    k = kept_width(d, settings.sparsity, step)
    score_file = load_scores(scores) if scores is not None else None
    if score_file is not None:  # the mask is chosen where the scores were profiled
        calibration = replace(calibration, site=score_file[1]["settings"].get("site", calibration.site))
    if score_file is not None and score_file[1].get("hidden_size") != d:
        raise DietError(f"{scores} was profiled on a model of width {score_file[1].get('hidden_size')}, "
                        f"not {d}; profile this model")
    context = Context(dense, loaded.tokenizer, calibration)
    params_before = count_params(dense)
    pinned_sources = [pinned(spec) for spec in calibration.calibration]  # rebuilds refuse changed files
    record = {"format": FORMAT, "source_model": loaded.name, "hidden_size_before": d,
              "params_before": params_before,
              "settings": calibration.to_dict() | {"calibration": pinned_sources} | settings.to_dict()
              | runtime.to_dict(),
              "kept_width_step": step}
    if method.kind == "structural":
        target = sliced_param_count(dense, k)
        source = dense if in_place or not method.consumes else copy.deepcopy(dense)
        pruned, structure = method.build(source, loaded.tokenizer, context.task_texts(), target,
                                         calibration.batch_size, calibration.max_length)
        record |= {"kept_dims": list(range(pruned.config.hidden_size)), "structure": structure}
    else:
        if score_file is not None:
            stats, meta = score_file
            context.used |= meta.get("tasks", {})
        else:
            stats = method.scores(context, settings)
        keep, agreement_by_task = choose_dims(stats, k, settings)
        record |= {"kept_dims": keep.tolist(), "task_agreement": agreement_by_task}
        if settings.recover == "none":
            pruned = slice_model(dense, keep, in_place)
        else:
            pruned, record["recovery"] = _recover(dense, keep, context, settings, in_place)
    if hasattr(dense, "hf_device_map"):  # dispatched by accelerate: the pruned model is placed alike
        pruned = place_like(pruned, dense, runtime.device_map or "auto")
    save_dtype = loaded.stored_dtype if runtime.save_dtype == "auto" else getattr(torch, runtime.save_dtype)
    record |= {"hidden_size_after": pruned.config.hidden_size, "params_after": count_params(pruned),
               "calibration": context.used, "versions": versions(),
               "seconds": round(time.perf_counter() - started, 1)}
    return Pruned(pruned, loaded.tokenizer, record, save_dtype)


def choose_dims(stats: dict[str, ActivationStats], k: int, settings: PruneSettings
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """The k hidden dims a hidden-dim method keeps, from its per-source stats, and how many of each
    merged source's own top-k they are."""
    names = _merged_names(list(stats), settings.merge_tasks)
    matrix = torch.stack([stats[name].score(settings.aggregation) for name in names])
    keep = merge(matrix, k, settings.merge)
    return keep, agreement(matrix, keep, names)


def _merged_names(names: list[str], merge_tasks: tuple[str, ...]) -> list[str]:
    """The sources whose scores are merged: all, or the requested subset of the profiled tasks."""
    if not merge_tasks:
        return names
    unknown = sorted(set(merge_tasks) - set(names))
    if unknown:
        raise DietError(f"cannot merge {', '.join(unknown)}: not among the profiled {', '.join(names)}")
    return [n for n in names if n in merge_tasks]


def _recover(dense, keep: torch.Tensor, context: Context, settings: PruneSettings, in_place: bool
             ) -> tuple[PreTrainedModel, dict]:
    """The slice of `dense` refit on the first calibration samples of each task, and its record."""
    from dietprune.recover import PARTS, recover

    started = time.perf_counter()
    corpora = [corpus.head(settings.recover_samples) for corpus in task_corpora(context.settings)]
    for corpus in corpora:  # usually a prefix of the profiled samples; not for data-free methods
        used = context.used.setdefault(corpus.name, {"ids": []})
        used["ids"] += [i for i in corpus.ids if i not in used["ids"]]
    texts = [text for corpus in corpora for text in corpus.texts]
    parts = ("readers",) if settings.recover == "lsq" else PARTS
    pruned = recover(dense, context.tokenizer, texts, keep, settings.recover_alpha,
                     context.settings.batch_size, context.settings.max_length, parts, in_place)
    return pruned, {"method": settings.recover, "parts": list(parts), "alpha": settings.recover_alpha,
            "seconds": round(time.perf_counter() - started, 1),
            "tasks": {corpus.name: {"ids": list(corpus.ids)} for corpus in corpora}}


def save(pruned: Pruned, out: str | Path, overwrite: bool = False, protected: tuple[Path, ...] = (),
         in_place: bool = False) -> Path:
    """Write the pruned model as a standard Hugging Face checkpoint in its save dtype, with its
    dietprune.json, atomically. `in_place` may convert the model itself to the save dtype (no second
    copy of the weights); otherwise the model in memory stays as it is."""
    out = Path(out)
    check_output_path(out, overwrite, protected)
    with atomic_dir(out, "replace" if overwrite else "refuse") as tmp:
        _write_checkpoint(pruned, tmp, in_place)
    return out


def _write_checkpoint(pruned: Pruned, directory: Path, in_place: bool) -> None:
    model, dtype = pruned.model, pruned.save_dtype
    record = pruned.record | {"saved_dtype": dtype_name(dtype)}
    state = None
    if model.dtype != dtype:
        if in_place and not hasattr(model, "hf_device_map"):
            model.to(dtype)
        else:  # a converted copy; tensors shared in the model (a tied head) stay shared
            converted: dict[int, torch.Tensor] = {}
            state = {name: converted.setdefault(t.data_ptr(), t.to(dtype)) if t.is_floating_point() else t
                     for name, t in full_state_dict(model).items()}
    serving = adapter_for(model.config).serving
    if serving and (rewrite := serving(model.config, full_state_dict(model) if state is None else state)):
        config, state, record["saved_as"] = rewrite  # the form engines run (models/serving.py)
        model = rebuild(config, state, dtype)
    model.save_pretrained(directory, state_dict=state)
    pruned.tokenizer.save_pretrained(directory)
    (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def evaluate(model: str | PreTrainedModel | Loaded | Pruned | None = None, tokenizer=None, *,
             settings: EvalSettings | None = None, calibration: CalibrationSettings | None = None,
             runtime: RuntimeSettings | None = None, **options) -> dict:
    """Zero-shot accuracy on the calibration tasks and the held-out ones, never on calibration examples
    (those a pruned model records, and the default subsets), plus perplexity on held-out text.

    backend "dietprune" is our fast evaluator; "lm-eval" runs lm-evaluation-harness on the same examples."""
    settings, calibration, runtime = settings_for(options, EvalSettings, CalibrationSettings, RuntimeSettings,
                                                  given=(settings, calibration, runtime), command="eval")
    if isinstance(model, Pruned):
        model = Loaded(model.model, model.tokenizer, "pruned", model.record)
    loaded = _loaded(model, tokenizer, runtime)
    tasks = tuple(calibration.tasks) + tuple(t for t in settings.heldout if t not in calibration.tasks)
    exclude = excluded_ids(loaded.record, calibration)
    source, include_path = calibration.data_source, calibration.include_path
    if settings.backend == "lm-eval":
        from dietprune.lm_eval_bridge import evaluate_lm_eval

        results = evaluate_lm_eval(loaded.model, loaded.tokenizer, tasks, settings.limit, exclude,
                                   source=source, include_path=include_path)  # its own batch size
    else:
        results = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, settings.limit, exclude,
                                 settings.eval_batch_size, source=source, include_path=include_path)
        if settings.perplexity:
            results["perplexity"] = perplexity(loaded.model, loaded.tokenizer, progress=True)
    for task, result in results["tasks"].items():
        if set(result["ids"]) & exclude.get(task, set()):
            raise DietError(f"{task}: evaluation examples overlap the calibration examples")
    results["model"] = loaded.name
    results["heldout"] = [t for t in tasks if t not in calibration.tasks]
    return results


def run(model: str | None, out: Path, prune_settings: PruneSettings | None = None,
        calibration: CalibrationSettings | None = None, eval_settings: EvalSettings | None = None,
        runtime: RuntimeSettings | None = None, overwrite: bool = False) -> dict:
    """The main job: evaluate the dense model, prune it (in its own memory when nothing needs the dense
    weights afterwards), evaluate the pruned model on the same examples, and write the checkpoint and
    a report under `out`."""
    prune_settings = prune_settings or PruneSettings()
    calibration, eval_settings = calibration or CalibrationSettings(), eval_settings or EvalSettings()
    runtime = runtime or RuntimeSettings()
    local = Path(model).expanduser() if model else None
    check_output_path(out, overwrite, protected=(local,) if local and local.exists() else ())
    loaded = load(model, runtime)
    dense_results = evaluate(loaded, settings=eval_settings, calibration=calibration)
    compared = {}
    paper = replace(prune_settings, recover="none")
    site = calibration.for_recovery(prune_settings.recover).site
    if prune_settings.method == "diet" and (prune_settings, site) != (paper, "block_output"):
        paper_model = prune(loaded, settings=paper, calibration=replace(calibration, site="block_output"),
                            runtime=runtime)  # the paper's DIET at the same K, beside the configured one
        compared["paper DIET"] = evaluate(paper_model, settings=eval_settings, calibration=calibration)
        del paper_model
    pruned = prune(loaded, settings=prune_settings, calibration=calibration, runtime=runtime, in_place=True)
    del loaded
    pruned_results = evaluate(pruned, settings=eval_settings, calibration=calibration)
    pruned_results["model"] = str(out / "pruned")
    compared[_label(pruned.record) if compared else "pruned"] = pruned_results
    summary = {"prune": {k: v for k, v in pruned.record.items() if k != "kept_dims"},
               "dense": dense_results, "pruned": pruned_results, "heldout": list(eval_settings.heldout),
               "dtype": dtype_name(pruned.model.dtype)}
    if "paper DIET" in compared:
        summary["paper"] = compared["paper DIET"]
    with atomic_dir(out, "replace" if overwrite else "refuse") as tmp:
        _write_checkpoint(pruned, tmp / "pruned", in_place=True)  # evaluated: it may change now
        summary["disk_bytes"] = sum(f.stat().st_size for f in (tmp / "pruned").iterdir())
        saved = {"disk_bytes": summary["disk_bytes"], "saved_dtype": dtype_name(pruned.save_dtype)}
        table = run_report(pruned.record | saved, dense_results, compared, tuple(eval_settings.heldout))
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (tmp / "report.md").write_text(table + "\n")
        run_plot({"dense": dense_results, **compared}, tuple(eval_settings.heldout), tmp / "report.png")
    return summary | {"table": table}


def _label(record: dict) -> str:
    """A short name of how a model was pruned: method, activation site, recovery."""
    settings = record["settings"]
    return "+".join([settings["method"], *(["norm-site"] if settings["site"] == "norm_output" else []),
                     *([settings["recover"]] if settings["recover"] != "none" else [])])
