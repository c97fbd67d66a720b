"""Quality of pruning configurations (issue 16): each one pruned from the same dense model in memory and
evaluated on a development split (to choose) or the test split (to report).

    .venv/bin/python benchmarks/quality.py --split dev --sparsity 0.2 --configs diet diet+lsq diet+full
    .venv/bin/python benchmarks/quality.py --split test --sparsity 0.1 0.2 0.3 --configs diet diet+full

Splits, never overlapping each other or any calibration sample:
  test  what RESULTS.md reports: the first 300 evaluation examples of the 7 tasks and PIQA (held out),
        perplexity on the last 256 LAMBADA passages (as `diet sweep --limit 300`); with `--heldout`
        also the first 300 of SciQ, Social IQa and CommonsenseQA and all 100 of COPA (lm-eval's
        definitions, offline copies), tasks no configuration calibrates on;
  dev   evaluation examples 300-399 of the six tasks that have that many (BoolQ, HellaSwag,
        WinoGrande, ARC-Easy, OpenBookQA, PIQA), perplexity on LAMBADA passages 3000-3255 (no method
        calibrates on them: generic calibration takes at most 700 passages from the front); with
        `--heldout` also examples 300-399 of SciQ, Social IQa and CommonsenseQA.
A result file that lacks tasks a run asks for gets them added (the model is pruned again).
A configuration is a name from CONFIGS (prune options as in a config file). Each result is cached as
benchmarks/results/quality-<model>/<config>-s<sparsity>-<split>.json, so a run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dietprune.api import load, prune
from dietprune.evaluate import evaluate, excluded_ids, perplexity, select_examples
from dietprune.merge import kept_width, kept_width_step
from dietprune.metrics import average, average_stderr, paired_difference
from dietprune.settings import CalibrationSettings
from dietprune.slice import sliced_param_count
from dietprune.tasks import load_examples
from dietprune.tasks.data import lambada_passages

# Every name pins its site and recovery, over issue 16's recovery set (the defaults are what these runs
# chose, so they change): 32 samples a task, no generic text, damping 0.01, the head's gains.
ISSUE_16 = {"recover_samples": 32, "recover_generic": 0, "recover_alpha": 0.01, "recover_head": "gains"}
CONFIGS: dict[str, dict] = {name: ISSUE_16 | options for name, options in {
    "diet": {"site": "block_output", "recover": "none"},
    "diet+lsq": {"site": "block_output", "recover": "lsq"},
    "diet+full": {"site": "block_output", "recover": "full"},
    "norm-site+full": {"site": "norm_output", "recover": "full"},
    "random+full": {"method": "random", "site": "block_output", "recover": "full"},
    # issue 27: what the refit sees
    "norm-site+full+generic": {"site": "norm_output", "recover": "full", "recover_generic": 224},
    "norm-site+full+64": {"site": "norm_output", "recover": "full", "recover_samples": 64},
    "norm-site+full+64+generic": {"site": "norm_output", "recover": "full", "recover_samples": 64,
                                  "recover_generic": 448},
    # issue 27, round 3: which dims go, and the refit's damping
    "obs+full": {"method": "obs", "site": "norm_output", "recover": "full"},
    "norm-site+full+a0.1": {"site": "norm_output", "recover": "full", "recover_alpha": 0.1},
    "norm-site+full+a0.001": {"site": "norm_output", "recover": "full", "recover_alpha": 0.001},
    # issue 27, round 4: pruned in two steps (the second masks and refits the first's refit model)
    "norm-site+full+2step": {"site": "norm_output", "recover": "full", "steps": (0.1,)},
    "norm-site+full+a1": {"site": "norm_output", "recover": "full", "recover_alpha": 1.0},
    # issue 27, round 5: more steps; two steps with the third round's better damping
    "norm-site+full+4step": {"site": "norm_output", "recover": "full", "steps": (0.05, 0.1, 0.15)},
    "norm-site+full+2step+a0.1": {"site": "norm_output", "recover": "full", "steps": (0.1,),
                                  "recover_alpha": 0.1},
    # issue 27, round 6: the second and third rounds' small gains together
    "norm-site+full+64+generic+a0.1": {"site": "norm_output", "recover": "full", "recover_samples": 64,
                                       "recover_generic": 448, "recover_alpha": 0.1},
}.items()}
# issue 27, round 7: part of the budget on MLP channels ("hidden": that share of hidden dims, then MLP
# channels up to the parameter count of the hidden-only slice at the run's sparsity), the default's recovery
ROUND_6 = CONFIGS["norm-site+full+64+generic+a0.1"]
CONFIGS |= {f"h{round(100 * hidden)}+mlp": ROUND_6 | {"hidden": hidden} for hidden in (0.1, 0.15, 0.2, 0.25)}
# issue 27, round 8: each fit's damping chosen on held-out calibration batches
CONFIGS["grid"] = ROUND_6 | {"recover_alpha_grid": (0.01, 0.1, 1.0)}
# issue 27: what the default's mask is worth once the refit is there (a measurement, no decision)
CONFIGS |= {f"random{seed}+default": ROUND_6 | {"method": "random", "random_seed": seed} for seed in (0, 1)}
CONFIGS["agnostic+default"] = ROUND_6 | {"method": "agnostic"}
# issue 27, round 9: the head's K columns refit as a linear map of all d (a tied embedding with them)
CONFIGS["head-linear"] = ROUND_6 | {"recover_head": "linear"}
TEST_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
DEV_TASKS = ("boolq", "hellaswag", "winogrande", "arc_easy", "openbookqa", "piqa")
HELDOUT = {"test": ("sciq", "social_iqa", "commonsense_qa", "copa"),  # calibrated on by no configuration
           "dev": ("sciq", "social_iqa", "commonsense_qa")}
TEST_LIMIT, DEV_OFFSET, DEV_LIMIT = 300, 300, 100


def split_examples(split: str, record: dict | None, heldout: bool) -> tuple[tuple[str, ...], dict, int, list]:
    """(tasks, excluded ids, limit, perplexity texts) of a split."""
    exclude = excluded_ids(record, CalibrationSettings(tasks=TEST_TASKS[:-1]))
    tasks = (TEST_TASKS if split == "test" else DEV_TASKS) + (HELDOUT[split] if heldout else ())
    if split == "test":
        return tasks, exclude, TEST_LIMIT, None
    for task in tasks:  # the test examples are excluded too: dev starts after them
        exclude.setdefault(task, set()).update(ex.id for ex in select_examples(task, TEST_LIMIT, exclude))
    return tasks, exclude, DEV_LIMIT, [text for _, text in lambada_passages()[3000:3256]]


def measure(model, tokenizer, split: str, record: dict | None, tasks_too: bool, heldout: bool,
            done: dict | None = None) -> dict:
    """The split's results, adding to `done` (an earlier result file) only what it lacks."""
    tasks, exclude, limit, texts = split_examples(split, record, heldout)
    results = done or {"tasks": {}}
    missing = [t for t in tasks if t not in results["tasks"]] if tasks_too else []
    if missing:
        results["tasks"] |= evaluate(model, tokenizer, missing, limit, exclude)["tasks"]
    if "perplexity" not in results:
        results["perplexity"] = perplexity(model, tokenizer, texts, progress=True)
    return results


def complete(path: Path, split: str, heldout: bool, tasks_too: bool) -> bool:
    """Whether a result file holds every task (and perplexity) the run asks for."""
    if not path.is_file():
        return False
    result = json.loads(path.read_text())
    tasks = split_examples(split, None, heldout)[0] if tasks_too else ()
    return "perplexity" in result and all(t in result.get("tasks", {}) for t in tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--perplexity-only", action="store_true", help="skip the tasks (SmolLM2's check)")
    parser.add_argument("--heldout", action="store_true", help="also tasks no configuration calibrates on")
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/quality-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    dense = load(args.model)
    tasks_too = not args.perplexity_only
    path = out / f"dense-{args.split}.json"
    if not complete(path, args.split, args.heldout, tasks_too):
        done = json.loads(path.read_text()) if path.is_file() else None
        measured = measure(dense.model, dense.tokenizer, args.split, None, tasks_too, args.heldout, done)
        path.write_text(json.dumps(measured, indent=1))
    for sparsity in args.sparsity:
        for name in args.configs:
            path = out / f"{name}-s{round(sparsity * 100):02d}-{args.split}.json"
            if complete(path, args.split, args.heldout, tasks_too):
                continue
            done = json.loads(path.read_text()) if path.is_file() else None
            started = time.perf_counter()
            pruned = pruned_in_steps(dense, sparsity, dict(CONFIGS[name]))
            seconds = time.perf_counter() - started
            result = measure(pruned.model, pruned.tokenizer, args.split, pruned.record, tasks_too,
                             args.heldout, done)
            result["prune"] = {k: v for k, v in pruned.record.items()
                               if k not in ("kept_dims", "calibration")}
            result.setdefault("prune_seconds", seconds)
            path.write_text(json.dumps(result, indent=1))
            print(json.dumps({"config": name, "sparsity": sparsity, "ppl": result["perplexity"]["perplexity"],
                              "seconds": round(seconds)}), flush=True)
            del pruned


def pruned_in_steps(dense, sparsity: float, options: dict):
    """The dense model pruned as `options` say; with "steps" (sparsities of the dense width), first to
    each of those, then from there to the width `sparsity` gives the dense model; with "hidden", see
    `budget_matched`."""
    config = dense.model.config
    sparsity, options = budget_matched(dense.model, sparsity, options)
    model, tokenizer, width = dense, None, config.hidden_size
    for step in (*options.pop("steps", ()), sparsity):
        kept = kept_at(config, step)
        pruned = prune(model, tokenizer, sparsity=1 - kept / width, **options)
        model, tokenizer, width = pruned.model, pruned.tokenizer, kept
    return pruned


def kept_at(config, sparsity: float) -> int:
    """The dense width K a prune at `sparsity` keeps (the automatic --round-to)."""
    return kept_width(config.hidden_size, sparsity, kept_width_step(config, sparsity, None))


def budget_matched(model, sparsity: float, options: dict) -> tuple[float, dict]:
    """(hidden sparsity, options): with "hidden" in `options`, that share of hidden dims and the share of
    MLP channels (--mlp-sparsity) nearest to the parameter count of the hidden-only slice at `sparsity`
    (a gated MLP channel at width k: a row of gate and of up, a column of down, k parameters each)."""
    options = dict(options)
    hidden = options.pop("hidden", None)
    if hidden is None:
        return sparsity, options
    config = model.config
    k = kept_at(config, hidden)
    surplus = sliced_param_count(model, k) - sliced_param_count(model, kept_at(config, sparsity))
    channels = round(surplus / (3 * k * config.num_hidden_layers))
    return hidden, options | {"mlp_sparsity": channels / config.intermediate_size}


def table(out: Path, split: str) -> str:
    """Markdown of every cached result of a split: the profiled-task average and PIQA (± standard error),
    each configuration's paired difference to plain DIET at its sparsity, perplexity, prune time."""
    tasks = [t for t in (TEST_TASKS if split == "test" else DEV_TASKS) if t != "piqa"]
    rows = {p.name.removesuffix(f"-{split}.json"): json.loads(p.read_text())
            for p in sorted(out.glob(f"*-{split}.json"))}
    lines = [f"| configuration | {len(tasks)}-task avg | - diet (paired) | PIQA (held out) | perplexity | "
             "prune s |", "|---|---:|---:|---:|---:|---:|"]
    for name, result in rows.items():
        plain = rows.get(f"diet-{name.rsplit('-', 1)[-1]}") if name != "dense" else None
        cells = ["", "", ""]
        if "tasks" in result:
            cells[0] = f"{100 * average(result, tasks):.1f} ± {100 * average_stderr(result, tasks):.1f}"
            if plain is not None and plain is not result and "correct" in plain["tasks"][tasks[0]]:
                delta, err = paired_difference(result, plain, tasks)
                cells[1] = f"{100 * delta:+.1f} ± {100 * err:.1f}"
            if "piqa" in result["tasks"]:
                piqa = result["tasks"]["piqa"]
                cells[2] = f"{100 * piqa['acc']:.1f} ± {100 * piqa['acc_stderr']:.1f}"
        seconds = f"{result['prune_seconds']:.0f}" if "prune_seconds" in result else ""
        ppl = result["perplexity"]["perplexity"]
        lines.append(f"| {name} | {' | '.join(cells)} | {ppl:,.1f} | {seconds} |")
    return "\n".join(lines)


def chance(task: str, ids: list[str]) -> float:
    """The accuracy of guessing on these examples: the mean of 1 / number of choices."""
    by_id = {ex.id: ex for ex in load_examples(task)}
    return sum(1 / len(by_id[i].choices) for i in ids) / len(ids)


def heldout_table(out: Path, split: str, reference: str = "norm-site+full-s20") -> str:
    """Markdown of the results that hold the held-out tasks: the profiled and the held-out averages
    (± standard error), each one's paired difference to `reference` (the default), the share of the
    dense model's above-chance accuracy each keeps, perplexity and prune time."""
    profiled = [t for t in (TEST_TASKS if split == "test" else DEV_TASKS) if t != "piqa"]
    heldout = ["piqa", *HELDOUT[split]]
    rows = {p.name.removesuffix(f"-{split}.json"): json.loads(p.read_text())
            for p in sorted(out.glob(f"*-{split}.json"))}
    rows = {name: r for name, r in rows.items() if all(t in r.get("tasks", {}) for t in profiled + heldout)}
    dense, base = rows.get("dense"), rows.get(reference)
    lines = ["| configuration | profiled avg | - default (paired) | held-out avg | - default (paired) | "
             "retained profiled | retained held-out | perplexity | prune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in rows.items():
        cells = []
        for tasks in (profiled, heldout):
            cells.append(f"{100 * average(result, tasks):.1f} ± {100 * average_stderr(result, tasks):.1f}")
            if base is not None and result is not base and name != "dense":
                delta, err = paired_difference(result, base, tasks)
                cells.append(f"{100 * delta:+.1f} ± {100 * err:.1f}")
            else:
                cells.append("")
        for tasks in (profiled, heldout):
            floor = sum(chance(t, result["tasks"][t]["ids"]) for t in tasks) / len(tasks)
            kept = (average(result, tasks) - floor) / (average(dense, tasks) - floor) if dense else None
            cells.append(f"{100 * kept:.0f}%" if kept is not None else "")
        seconds = f"{result['prune_seconds']:.0f}" if "prune_seconds" in result else ""
        ppl = result["perplexity"]["perplexity"]
        lines.append(f"| {name} | {' | '.join(cells)} | {ppl:,.1f} | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # quality.py --table DIR SPLIT
        print(table(Path(sys.argv[2]), sys.argv[3]))
    elif sys.argv[1:2] == ["--heldout-table"]:  # quality.py --heldout-table DIR SPLIT [REFERENCE]
        print(heldout_table(Path(sys.argv[2]), sys.argv[3], *sys.argv[4:5]))
    else:
        main()
