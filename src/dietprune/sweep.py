"""`diet sweep`: methods x sparsities (x recovery) -> cached cells, a results JSON, tables and a plot.

Each cell prunes with the same slicing path, evaluates on the profiled tasks and the held-out ones, and
is saved as its own JSON file; a re-run skips finished cells, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dietprune.api import ProfileSettings, PruneSettings, evaluate_model, prune
from dietprune.errors import DietError
from dietprune.evaluate import dtype_name
from dietprune.io import write_json_atomic
from dietprune.tasks import DEFAULT_TASKS, load_examples

# A variant is a method with its settings: PruneSettings fields, and ProfileSettings fields under
# "profile". Besides DIET and the baselines, the ablations that decide whether task-awareness matters.
VARIANTS: dict[str, dict] = {
    "diet": {"method": "diet", "merge": "vote"},
    "mean": {"method": "diet", "merge": "mean"},
    "weighted": {"method": "diet", "merge": "weighted"},
    "l2": {"method": "diet", "aggregation": "l2"},
    "norm-site": {"method": "diet", "profile": {"site": "norm_output"}},
    "relative": {"method": "relative"},
    "act-weight": {"method": "act-weight"},
    **{f"only-{task}": {"method": "diet", "merge_tasks": (task,)} for task in DEFAULT_TASKS},
    **{f"samples-{n}": {"method": "diet", "profile": {"samples": n}} for n in (10, 50, 200)},
    "agnostic": {"method": "agnostic"},
    "shortgpt": {"method": "shortgpt"},
    "wanda-sp": {"method": "wanda-sp"},
    "slicegpt": {"method": "slicegpt"},
    "magnitude": {"method": "magnitude"},
    **{f"random-{seed}": {"method": "random", "random_seed": seed} for seed in (0, 1, 2)},
}
DEFAULT_VARIANTS = ("diet", "mean", "agnostic", "magnitude", "random-0")


def cell_name(variant: str, sparsity: float, recover: str) -> str:
    return f"{variant}-s{round(sparsity * 100):02d}-{recover}"


def variant_settings(variant: str, base: PruneSettings, profile_settings: ProfileSettings,
                     sparsity: float, recover: str = "none") -> tuple[PruneSettings, ProfileSettings]:
    """The prune and profile settings of one variant at one sparsity."""
    overrides = dict(VARIANTS[variant])
    profiled = replace(profile_settings, **overrides.pop("profile", {}))
    return replace(base, sparsity=sparsity, recover=recover, **overrides), profiled


def sweep(model_spec: str | None, out: Path, variants: list[str], sparsities: list[float],
          recoveries: list[str], base: PruneSettings, profile_settings: ProfileSettings,
          heldout: tuple[str, ...], limit: int | None, dtype=None, fresh: bool = False) -> dict:
    """Run every missing cell, then write results.json, results.md and accuracy.png under `out`.

    `fresh` discards the cells of an earlier sweep in `out` instead of resuming from them."""
    cells_dir = out / "cells"
    if fresh and cells_dir.exists():
        shutil.rmtree(cells_dir)
    cells_dir.mkdir(parents=True, exist_ok=True)
    plan = {cell_name(variant, sparsity, recover): variant_settings(variant, base, profile_settings, sparsity,
                                                                    recover)
            for sparsity in sparsities for variant in variants for recover in recoveries}
    check_cells(cells_dir, limit, dtype_name(dtype or torch.float32),
                {name: profiled for name, (_, profiled) in plan.items()})
    tasks = tuple(profile_settings.tasks) + tuple(t for t in heldout if t not in profile_settings.tasks)

    def cached(name: str, compute) -> dict:
        path = cells_dir / f"{name}.json"
        if not path.is_file():
            write_json_atomic(path, compute())
        return json.loads(path.read_text())

    cells = {"dense": cached("dense", lambda: evaluate_model(model_spec, tasks, limit, profile_settings,
                                                             dtype=dtype))}
    for name, (settings, profiled) in plan.items():
        try:
            cells[name] = cached(name, lambda s=settings, p=profiled: _prune_and_evaluate(
                model_spec, s, p, tasks, limit, dtype))
        except DietError as exc:  # a method that does not apply to this model: reported, not cached
            cells[name] = {"error": str(exc)}
    results = {"tasks": list(tasks), "heldout": list(heldout), "limit": limit, "cells": cells}
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(tables(results, variants, sparsities, recoveries) + "\n")
    plot(results, variants, sparsities, recoveries, out / "accuracy.png")
    return results


def check_cells(cells_dir: Path, limit: int | None, dtype: str, profiles: dict[str, ProfileSettings]) -> None:
    """Refuse to resume from cells evaluated on other examples or in another dtype, or from the cells
    this sweep asks for (`profiles`, by name, in sweep order) profiled with other settings (e.g. another
    --site or --seed)."""
    cells = {path.stem: json.loads(path.read_text()) for path in sorted(cells_dir.glob("*.json"))}
    for name, cell in cells.items():
        recorded = cell.get("settings", {})
        for flag, value in (("--limit", limit), ("--dtype", dtype)):
            if recorded.get(flag[2:], value) != value:
                raise DietError(f"{cells_dir / name}.json was evaluated with {flag} "
                                f"{recorded[flag[2:]]}, not {value}: use another --out, or --overwrite to "
                                "discard the earlier cells")
    for name, profiled in profiles.items():
        recorded = cells.get(name, {}).get("profile_settings")
        expected = json.loads(json.dumps(asdict(profiled)))
        if recorded is not None and recorded != expected:
            changed = ", ".join(k for k in expected if recorded.get(k) != expected[k])
            raise DietError(f"{cells_dir / name}.json was profiled with another {changed}: use another "
                            "--out, or --overwrite to discard the earlier cells")


def _prune_and_evaluate(model_spec, settings: PruneSettings, profile_settings: ProfileSettings,
                        tasks: tuple[str, ...], limit: int | None, dtype) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="diet-sweep-"))
    try:
        record = prune(model_spec, tmp / "model", settings, profile_settings).record
        results = evaluate_model(str(tmp / "model"), tasks, limit, profile_settings, dtype=dtype)
    finally:
        shutil.rmtree(tmp)
    results["prune"] = {k: v for k, v in record.items() if k not in ("kept_dims", "profile")}
    results["kept_dims"] = record["kept_dims"]
    results["profile_settings"] = record["profile"].get("settings")
    return results


def _average(cell: dict, tasks: list[str]) -> float:
    if "error" in cell:
        return math.nan
    return sum(cell["tasks"][t]["acc"] for t in tasks) / len(tasks)


def _average_stderr(cell: dict, tasks: list[str]) -> float:
    """Standard error of the average over tasks (tasks' examples independent)."""
    return math.sqrt(sum(cell["tasks"][t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks)


def correct(result: dict, golds: dict[str, int]) -> np.ndarray:
    """Per example of one task's result: 1.0 where the acc prediction is right (or, for a seed mean,
    the share of seeds that are right)."""
    if "correct" in result:
        return np.asarray(result["correct"], dtype=float)
    return (np.array(result["preds"]) == np.array([golds[i] for i in result["ids"]])).astype(float)


def seed_mean(cells: list[dict], tasks: list[str], golds: dict[str, dict[str, int]]) -> dict:
    """One cell for the mean of several seeds' cells on the same examples: per example, the share of
    seeds that are right; its acc is the mean acc, its standard error that of the per-example shares."""
    merged = {}
    for task in tasks:
        ids = cells[0]["tasks"][task]["ids"]
        if any(c["tasks"][task]["ids"] != ids for c in cells):
            raise DietError(f"{task}: the seeds were evaluated on different examples")
        share = np.mean([correct(c["tasks"][task], golds[task]) for c in cells], axis=0)
        merged[task] = {"ids": ids, "correct": share.tolist(), "acc": float(share.mean()),
                        "acc_stderr": float(share.std(ddof=1) / math.sqrt(len(share)))}
    return {"tasks": merged, "prune": cells[0]["prune"]}


def paired_difference(cell: dict, reference: dict, tasks: list[str], golds: dict[str, dict[str, int]]
                      ) -> tuple[float, float]:
    """Average over tasks of (cell acc - reference acc) on the same examples, and its standard error:
    per-example differences within a task (paired), tasks independent."""
    means, variances = [], []
    for task in tasks:
        mine, theirs = cell["tasks"][task], reference["tasks"][task]
        if mine["ids"] != theirs["ids"]:
            raise DietError(f"{task}: the two cells were evaluated on different examples")
        diff = correct(mine, golds[task]) - correct(theirs, golds[task])
        means.append(diff.mean())
        variances.append(diff.var(ddof=1) / len(diff))
    return float(np.mean(means)), math.sqrt(sum(variances)) / len(tasks)


def tables(results: dict, variants, sparsities, recoveries) -> str:
    """Markdown in the paper's shape: one block per sparsity, rows = methods, acc per task + averages,
    and each method's paired difference to DIET (vote) on the same examples when DIET is in the sweep."""
    heldout = results["heldout"]
    profiled = [t for t in results["tasks"] if t not in heldout]
    source = results["cells"]["dense"]["settings"]["source"]
    golds = {t: {ex.id: ex.gold for ex in load_examples(t, source)} for t in profiled + heldout}
    versus = "diet" in variants
    header = ("| method | params | " + " | ".join(profiled) + " | **avg** | " + ("avg - diet | " * versus)
              + " | ".join(f"{t} (held out)" for t in heldout) + " | ppl |")
    rule = "|---|---:|" + "---:|" * (len(profiled) + 2 + versus + len(heldout))

    def row(label: str, cell: dict, reference: dict | None) -> str:
        if "error" in cell:
            return f"| {label} | – | n/a: {cell['error']} |"
        params = cell.get("prune", {}).get("params_after")
        accs = [f"{100 * cell['tasks'][t]['acc']:.1f}" for t in profiled]
        held = [f"{100 * cell['tasks'][t]['acc']:.1f}" for t in heldout]
        ppl = f"{cell['perplexity']['perplexity']:.1f}" if "perplexity" in cell else "–"
        avg = f"**{100 * _average(cell, profiled):.1f}** ± {100 * _average_stderr(cell, profiled):.1f} | "
        if versus:
            usable = reference is not None and "error" not in reference and reference is not cell
            delta, err = paired_difference(cell, reference, profiled, golds) if usable else (None, None)
            avg += f"{100 * delta:+.1f} ± {100 * err:.1f} | " if usable else "– | "
        return (f"| {label} | {f'{params / 1e6:.1f}M' if params else 'dense'} | " + " | ".join(accs)
                + f" | {avg}" + " | ".join(held) + f" | {ppl} |")

    blocks = [f"acc (%), {results['limit']} examples per task (fewer where the split, after calibration, "
              "has fewer); avg ± its standard error"
              + ("; avg - diet: paired difference to DIET on the same examples ± its standard error" if versus
                 else "")
              + "; held-out tasks are never profiled; ppl = perplexity on 256 held-out LAMBADA passages.\n",
              "**dense**\n", header, rule, row("dense", results["cells"]["dense"], None), ""]
    for sparsity in sparsities:
        blocks += [f"**sparsity {sparsity:.0%}**\n", header, rule]
        for recover in recoveries:
            reference = results["cells"].get(cell_name("diet", sparsity, recover))
            suffix = " + lsq" if recover == "lsq" else ""
            for variant in variants:
                blocks.append(row(variant + suffix, results["cells"][cell_name(variant, sparsity, recover)],
                                  reference))
            seeds = [results["cells"][cell_name(v, sparsity, recover)] for v in variants
                     if v.startswith("random-")]
            if len(seeds) > 1 and not any("error" in c for c in seeds):
                blocks.append(row(f"random, mean of {len(seeds)} seeds{suffix}",
                                  seed_mean(seeds, profiled + heldout, golds), reference))
        blocks.append("")
    return "\n".join(blocks)


def plot(results: dict, variants, sparsities, recoveries, png: Path) -> None:
    """Average accuracy over the profiled tasks vs sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiled = [t for t in results["tasks"] if t not in results["heldout"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = 100 * _average(results["cells"]["dense"], profiled)
    ax.axhline(dense, color="black", ls=":", label="dense")
    for variant in variants:
        for recover in recoveries:
            ys = [100 * _average(results["cells"][cell_name(variant, s, recover)], profiled)
                  for s in sparsities]
            ax.plot([100 * s for s in sparsities], ys, marker="o", ls="--" if recover == "lsq" else "-",
                    label=variant + (" + lsq" if recover == "lsq" else ""))
    ax.set(xlabel="sparsity (% of hidden dims removed)", ylabel="average acc (%)",
           title=f"{len(profiled)}-task average, {results['limit']} examples per task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
