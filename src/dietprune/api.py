"""What the CLI and notebooks call: load, profile, prune (in memory), save, evaluate, run.

The data flows one way: load -> plan (every option resolved, plan.py) -> execute (profile, merge, slice
and refit block by block, pipeline.py) -> record -> save -> evaluate -> report. `prune` takes a model
name or an already loaded model (what a notebook holds), so `run` and `sweep` load the dense model once
and every step reuses it:

    import dietprune
    pruned = dietprune.prune("gemma-3-270m", sparsity=0.3, recover="lsq")
    dietprune.save(pruned, "out/p30")
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import weakref
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from dietprune.assemble import save_model
from dietprune.device import execution_device, place_like
from dietprune.errors import DietError
from dietprune.evaluate import dtype_name, excluded_ids, perplexity
from dietprune.evaluate import evaluate as evaluate_tasks
from dietprune.io import atomic_dir, cache_root, check_output_path, commit_dir
from dietprune.merge import kept_width_record
from dietprune.methods import get_method
from dietprune.models.edit import count_params
from dietprune.models.load import RECORD, Loaded, load_model, resolve, stored_dtype, weight_bytes
from dietprune.pipeline import Pruned, calibrate, execute
from dietprune.plan import Plan, compute_dtype, make_plan, resolve_device, resolve_recover, resolve_site
from dietprune.profile import ActivationStats
from dietprune.report import run_plot, run_report
from dietprune.scores import load_scores, model_fingerprint
from dietprune.sequential import Weights
from dietprune.settings import (
    CalibrationSettings,
    EvalSettings,
    PruneSettings,
    RuntimeSettings,
    Settings,
    build,
    route,
)
from dietprune.tasks.sources import pinned
from dietprune.validate import validate
from dietprune.version import __version__

FORMAT = "dietprune.model/2"
log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Library versions that determine the numbers."""
    return {"dietprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def load(spec: str | None = None, runtime: RuntimeSettings | None = None) -> Loaded:
    """Load a model directory, .gguf file, hub id or embedded name (default: the embedded Gemma-3 270M)
    onto the runtime's device (or dispatched by accelerate with --device-map)."""
    runtime = runtime or RuntimeSettings()
    device = resolve_device(runtime.device)
    return load_model(spec, compute_dtype(runtime.dtype, device), device, runtime.device_map)


def profile(model: str | PreTrainedModel | Loaded | None = None, tokenizer=None, *,
            calibration_settings: CalibrationSettings | None = None, runtime: RuntimeSettings | None = None,
            **options) -> tuple[dict[str, ActivationStats], dict]:
    """Per task, the activation statistics of its calibration samples (at the site `diet prune` would
    profile), and the provenance a score file records with them (model, fingerprint, settings, the
    sample ids)."""
    calibration, runtime = settings_for(options, CalibrationSettings, RuntimeSettings,
                                        given=(calibration_settings, runtime), command="profile")
    validate(model, calibration, runtime, prunes=[(PruneSettings(), calibration)])
    plan, loaded = _planned(model, tokenizer, PruneSettings(), calibration, runtime)
    used: dict[str, dict] = {}
    weights = Weights(loaded.model, plan.device, plan.dtype, loaded.checkpoint)
    stats = calibrate(weights, loaded.tokenizer, plan, used).tasks
    meta = {"model": loaded.name, "model_fingerprint": model_fingerprint(weights),
            "hidden_size": loaded.model.config.hidden_size, "settings": plan.calibration.to_dict(),
            "tasks": used, "versions": versions()}
    return stats, meta


def _loaded(model: PreTrainedModel | Loaded, tokenizer) -> Loaded:
    if isinstance(model, Loaded):
        return model
    if tokenizer is None:
        raise DietError("a loaded model needs its tokenizer: prune(model, tokenizer, ...)")
    name = getattr(model.config, "_name_or_path", "") or "in-memory"
    return Loaded(model.eval(), tokenizer, name, model.dtype)


def _planned(model: str | PreTrainedModel | Loaded | None, tokenizer, settings: PruneSettings,
             calibration: CalibrationSettings, runtime: RuntimeSettings, score_site: str | None = None
             ) -> tuple[Plan, Loaded]:
    """The plan of a prune and the model it reads: a model in memory computes where it is (unless
    --device says otherwise) in its own dtype; a model named is planned from its config and files
    before any weight is read, then loaded as the plan says (onto the device, or streamed)."""
    if isinstance(model, (PreTrainedModel, Loaded)):
        loaded = _loaded(model, tokenizer)
        dense = loaded.model
        plan = make_plan(dense.config, settings, calibration, replace(runtime, weights="load"),
                         loaded.stored_dtype, home=execution_device(dense.get_input_embeddings()),
                         dtype=next(p.dtype for p in dense.parameters()), score_site=score_site)
        return plan, loaded
    source = resolve(model)
    local = Path(source.path)
    config = AutoConfig.from_pretrained(source.path)
    sizes = (lambda dtype: weight_bytes(local, dtype)) if local.is_dir() else None
    plan = make_plan(config, settings, calibration, runtime, stored_dtype(source.path), weight_bytes=sizes,
                     score_site=score_site)
    loaded = load_model(model, plan.dtype, plan.device, runtime.device_map, stream=plan.stream)
    return plan, loaded


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
          settings: PruneSettings | None = None, calibration_settings: CalibrationSettings | None = None,
          runtime: RuntimeSettings | None = None, scores: Path | None = None, in_place: bool = False,
          staging: Path | None = None, **options) -> Pruned:
    """Prune `model` (a name, or a loaded model and its tokenizer) and return the smaller model.

    A hidden-dim method (DIET by default) profiles or reads `scores`, merges them into one mask of
    exactly K dims, slices, and optionally recovers; a structural method (shortgpt, wanda-sp,
    slicegpt) chooses its own structure at the parameter count of that slice. `options` are flat option
    names, as in a config file (`sparsity=0.3`). `in_place` lets pruning reuse the given model's memory
    (the model given is destroyed); otherwise it stays as it was. A streamed prune (`--weights stream`)
    writes the pruned model into `staging` (default: a temporary folder) instead of memory. Under
    torchrun only the first process gets the model; the others' Pruned holds the record alone."""
    started = time.perf_counter()
    groups = (settings, calibration_settings, runtime)
    settings, calibration, runtime = settings_for(options, PruneSettings, CalibrationSettings,
                                                  RuntimeSettings, given=groups)
    score_file = load_scores(scores) if scores is not None else None
    if score_file is not None and get_method(settings.method).kind == "structural":
        raise DietError(f"{settings.method} chooses its own structure, not a mask of hidden dims: "
                        "--scores does not apply")
    if score_file is not None and "grams" in get_method(settings.method).needs:
        raise DietError(f"{settings.method} scores from Gram matrices a score file does not hold: "
                        "--scores does not apply")
    validate(model, calibration, runtime, prunes=[(settings, calibration)],
             scores=score_file[1] if score_file else None)
    score_site = score_file[1]["settings"].get("site") if score_file else None  # where they were profiled
    plan, loaded = _planned(model, tokenizer, settings, calibration, runtime, score_site)
    dense = loaded.model
    d = dense.config.hidden_size
    if score_file is not None and score_file[1].get("hidden_size") != d:
        raise DietError(f"{scores} was profiled on a model of width {score_file[1].get('hidden_size')}, "
                        f"not {d}; profile this model")
    pinned_sources = [pinned(spec) for spec in plan.calibration.calibration]  # rebuilds refuse changed files
    record = {"format": FORMAT, "source_model": loaded.name, "hidden_size_before": d,
              "params_before": count_params(dense),
              "settings": plan.calibration.to_dict() | {"calibration": pinned_sources}
              | plan.settings.to_dict() | runtime.to_dict(),
              "kept_width_step": plan.step}
    if plan.method.kind == "hidden":  # a structural method chooses its own widths
        record["width"] = kept_width_record(dense.config, plan.settings.sparsity, plan.settings.round_to)
        if record["width"]["lost"]:
            log.warning("%s", record["width"]["why"])
    if plan.stream and staging is None:
        staging = _staging()
    result, done = execute(plan, loaded, score_file, in_place, staging)
    pruned, checkpoint = (result, None) if isinstance(result, PreTrainedModel) else (None, result)
    if pruned is not None and hasattr(dense, "hf_device_map"):  # dispatched: the pruned model is placed alike
        pruned = place_like(pruned, dense, runtime.device_map or "auto")
    record |= done | {"versions": versions(), "seconds": round(time.perf_counter() - started, 1)}
    return Pruned(pruned, loaded.tokenizer, record, plan.save_dtype, checkpoint)


def _staging() -> Path:
    """A temporary folder for a streamed prune's output, removed when the process ends unless saved."""
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=root))
    weakref.finalize(folder, shutil.rmtree, str(folder), True)
    return folder


def save(pruned: Pruned, out: str | Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Path:
    """Write the pruned model as a standard Hugging Face checkpoint in its save dtype, with its
    dietprune.json, atomically: tensor by tensor, each converted on the host (the model in memory stays
    as it is). A streamed prune's checkpoint is already written: it is moved into place."""
    out = Path(out)
    if pruned.model is None and pruned.checkpoint is None:
        raise DietError("this process keeps no pruned model: under torchrun only the first one does; "
                        "save it there")
    check_output_path(out, overwrite, protected)
    record = pruned.record | {"saved_dtype": dtype_name(pruned.save_dtype)}
    if_exists = "replace" if overwrite else "refuse"
    if pruned.checkpoint is not None:
        directory = pruned.checkpoint.directory
        pruned.tokenizer.save_pretrained(directory)
        (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        commit_dir(directory, out, if_exists)
        pruned.checkpoint.directory = out
        return out
    with atomic_dir(out, if_exists) as tmp:
        _write_checkpoint(pruned, tmp, record)
    return out


def _write_checkpoint(pruned: Pruned, directory: Path, record: dict) -> None:
    note = save_model(Weights.of(pruned.model), directory, pruned.save_dtype)
    if note:
        record = record | {"saved_as": note}  # the form engines run (models/serving.py)
    pruned.tokenizer.save_pretrained(directory)
    (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def evaluate(model: str | PreTrainedModel | Loaded | Pruned | None = None, tokenizer=None, *,
             settings: EvalSettings | None = None, calibration_settings: CalibrationSettings | None = None,
             runtime: RuntimeSettings | None = None, **options) -> dict:
    """Zero-shot accuracy on the calibration tasks and the held-out ones, never on calibration examples
    (those a pruned model records, and the default subsets), plus perplexity on held-out text.

    backend "dietprune" is our fast evaluator; "lm-eval" runs lm-evaluation-harness on the same examples."""
    settings, calibration, runtime = settings_for(options, EvalSettings, CalibrationSettings, RuntimeSettings,
                                                  given=(settings, calibration_settings, runtime),
                                                  command="eval")
    validate(model, calibration, runtime, evaluation=settings)
    if isinstance(model, Pruned):
        if model.checkpoint is not None:  # streamed: evaluated from its files like any model directory
            loaded = replace(load(str(model.checkpoint.directory), runtime), name="pruned",
                             record=model.record)
        else:
            loaded = Loaded(model.model, model.tokenizer, "pruned", model.save_dtype, model.record)
    elif isinstance(model, (PreTrainedModel, Loaded)):
        loaded = _loaded(model, tokenizer)
    else:
        loaded = load(model, runtime)
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
            results["perplexity"] = perplexity(loaded.model, loaded.tokenizer,
                                               passages=settings.perplexity_passages, progress=True)
    for task, result in results["tasks"].items():
        if set(result["ids"]) & exclude.get(task, set()):
            raise DietError(f"{task}: evaluation examples overlap the calibration examples")
    results["model"] = loaded.name
    results["heldout"] = [t for t in tasks if t not in calibration.tasks]
    return results


def run(model: str | None, out: Path, prune_settings: PruneSettings | None = None,
        calibration_settings: CalibrationSettings | None = None, eval_settings: EvalSettings | None = None,
        runtime: RuntimeSettings | None = None, overwrite: bool = False) -> dict:
    """The main job: evaluate the dense model, prune it (in its own memory when nothing needs the dense
    weights afterwards), evaluate the pruned model on the same examples, and write the checkpoint and
    a report under `out`."""
    prune_settings = prune_settings or PruneSettings()
    calibration = calibration_settings or CalibrationSettings()
    eval_settings = eval_settings or EvalSettings()
    runtime = runtime or RuntimeSettings()
    local = Path(model).expanduser() if model else None
    check_output_path(out, overwrite, protected=(local,) if local and local.exists() else ())
    validate(model, calibration, runtime, prunes=[(prune_settings, calibration)], evaluation=eval_settings)
    loaded = load(model, runtime)
    dense_results = evaluate(loaded, settings=eval_settings, calibration_settings=calibration)
    compared = {}
    paper = replace(prune_settings, recover="none", recover_alpha_grid=(), mlp_sparsity=0.0,
                    recover_head="gains")
    site = resolve_site(calibration.site, resolve_recover(get_method(prune_settings.method),
                                                          prune_settings.recover))
    if prune_settings.method == "diet" and (prune_settings, site) != (paper, "block_output"):
        plan = _planned(loaded, None, prune_settings, calibration, runtime)[0]  # both sites in one pass
        weights = Weights(loaded.model, plan.device, plan.dtype)
        calibrate(weights, loaded.tokenizer, plan, {}, also=("block_output",))
        paper_model = prune(loaded, settings=paper,
                            calibration_settings=replace(calibration, site="block_output"),
                            runtime=runtime)  # the paper's DIET at the same K, beside the configured one
        compared["paper DIET"] = evaluate(paper_model, settings=eval_settings,
                                          calibration_settings=calibration)
        del paper_model
    pruned = prune(loaded, settings=prune_settings, calibration_settings=calibration, runtime=runtime,
                   in_place=True)
    del loaded
    pruned_results = evaluate(pruned, settings=eval_settings, calibration_settings=calibration)
    pruned_results["model"] = str(out / "pruned")
    compared[_label(pruned.record) if compared else "pruned"] = pruned_results
    summary = {"prune": {k: v for k, v in pruned.record.items() if k != "kept_dims"},
               "dense": dense_results, "pruned": pruned_results, "heldout": list(eval_settings.heldout),
               "dtype": dtype_name(pruned.model.dtype)}
    if "paper DIET" in compared:
        summary["paper"] = compared["paper DIET"]
    with atomic_dir(out, "replace" if overwrite else "refuse") as tmp:
        saved_dtype = {"saved_dtype": dtype_name(pruned.save_dtype)}
        _write_checkpoint(pruned, tmp / "pruned", pruned.record | saved_dtype)
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
