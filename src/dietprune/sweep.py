"""`diet sweep`: methods x sparsities (x recovery) -> cached cells, a results JSON, tables and a plot.

The dense model is loaded once. Each cell prunes it in memory through the same path as `diet prune`
(the dense model stays intact), is evaluated on the profiled tasks and the held-out ones, and is saved
as its own JSON file; a re-run skips finished cells, so an interrupted sweep resumes.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from dietprune.api import Loaded, evaluate, load, prune, settings_for
from dietprune.errors import DietError, NotApplicable
from dietprune.evaluate import dtype_name
from dietprune.io import ensure_dir, read_json, write_atomic, write_json_atomic
from dietprune.methods import VARIANTS, check_name, get_method
from dietprune.plan import compute_dtype, resolve_device, resolve_recover, resolve_site
from dietprune.report import cell_name, plot, tables
from dietprune.settings import (
    CalibrationSettings,
    EvalSettings,
    PruneSettings,
    RuntimeSettings,
    SweepSettings,
)
from dietprune.validate import validate


def variant_settings(variant: str, base: PruneSettings, calibration: CalibrationSettings, sparsity: float,
                     recover: str = "none") -> tuple[PruneSettings, CalibrationSettings]:
    """The prune and calibration settings of one variant at one sparsity."""
    overrides = VARIANTS[check_name("variants", variant, "--methods")] | {"sparsity": sparsity,
                                                                         "recover": recover}
    prune_settings, calibrated = settings_for(overrides, PruneSettings, CalibrationSettings,
                                              given=(base, calibration), command="sweep")
    recover = resolve_recover(get_method(prune_settings.method), prune_settings.recover)
    return prune_settings, replace(calibrated, site=resolve_site(calibrated.site, recover))


def sweep(model: str | None, out: Path, axes: SweepSettings, base: PruneSettings,
          calibration: CalibrationSettings, eval_settings: EvalSettings, runtime: RuntimeSettings,
          fresh: bool = False) -> dict:
    """Run every missing cell, then write results.json, results.md and accuracy.png under `out`.

    `fresh` discards the cells of an earlier sweep in `out` instead of resuming from them."""
    plan = {cell_name(variant, sparsity, recover): variant_settings(variant, base, calibration, sparsity,
                                                                    recover)
            for sparsity in axes.sparsities for variant in axes.methods for recover in axes.recover_modes}
    validate(model, calibration, runtime, prunes=list(plan.values()), evaluation=eval_settings)
    cells_dir = out / "cells"
    if fresh and cells_dir.exists():
        shutil.rmtree(cells_dir)
    ensure_dir(cells_dir)
    dtype = compute_dtype(runtime.dtype, resolve_device(runtime.device))
    check_cells(cells_dir, eval_settings.limit, dtype_name(dtype),
                {name: calibrated for name, (_, calibrated) in plan.items()})
    dense: list[Loaded] = []  # loaded on first need: a finished sweep re-renders without the model

    def model_once() -> Loaded:
        if not dense:
            dense.append(load(model, runtime))
        return dense[0]

    def cached(name: str, compute) -> dict:
        path = cells_dir / f"{name}.json"
        if not path.is_file():
            write_json_atomic(path, compute())
        return read_json(path, "sweep cell (delete it to recompute it)")

    cells = {"dense": cached("dense", lambda: evaluate(model_once(), settings=eval_settings,
                                                      calibration_settings=calibration))}
    for name, (settings, calibrated) in plan.items():
        try:
            cells[name] = cached(name, lambda s=settings, c=calibrated: _prune_and_evaluate(
                model_once(), s, c, eval_settings))
        except NotApplicable as exc:  # reported in its cell, not cached; any other error ends the sweep
            cells[name] = {"error": str(exc)}
    heldout = [t for t in eval_settings.heldout if t not in calibration.tasks]
    results = {"tasks": list(calibration.tasks) + heldout, "heldout": heldout, "limit": eval_settings.limit,
               "cells": cells}
    variants, sparsities, recoveries = list(axes.methods), list(axes.sparsities), list(axes.recover_modes)
    write_json_atomic(out / "results.json", results)
    write_atomic(out / "results.md", tables(results, variants, sparsities, recoveries) + "\n")
    plot(results, variants, sparsities, recoveries, out / "accuracy.png")
    return results


def check_cells(cells_dir: Path, limit: int | None, dtype: str,
                planned: dict[str, CalibrationSettings]) -> None:
    """Refuse to resume from cells evaluated on other examples or in another dtype, or from the cells
    this sweep asks for (`planned`, by name, in sweep order) calibrated with other settings (e.g. another
    --site or --seed)."""
    cells = {path.stem: read_json(path, "sweep cell (delete it to recompute it)")
             for path in sorted(cells_dir.glob("*.json"))}
    for name, cell in cells.items():
        recorded = cell.get("settings", {})
        for option, value in (("limit", limit), ("dtype", dtype)):
            if recorded.get(option, value) != value:
                raise DietError(f"{cells_dir / name}.json was evaluated with --{option} "
                                f"{recorded[option]}, not {value}: use another --out, or --overwrite to "
                                "discard the earlier cells")
    for name, calibrated in planned.items():
        recorded = cells.get(name, {}).get("prune", {}).get("settings")
        expected = calibrated.to_dict()
        if recorded is not None and any(recorded.get(k) != v for k, v in expected.items()):
            changed = ", ".join(k for k, v in expected.items() if recorded.get(k) != v)
            raise DietError(f"{cells_dir / name}.json was profiled with another {changed}: use another "
                            "--out, or --overwrite to discard the earlier cells")


def _prune_and_evaluate(dense: Loaded, settings: PruneSettings, calibration: CalibrationSettings,
                        eval_settings: EvalSettings) -> dict:
    pruned = prune(dense, settings=settings, calibration_settings=calibration)
    results = evaluate(pruned, settings=eval_settings, calibration_settings=calibration)
    results["prune"] = {k: v for k, v in pruned.record.items() if k not in ("kept_dims", "calibration")}
    results["kept_dims"] = pruned.record["kept_dims"]
    return results
