"""Human-readable reports from the JSON results: evaluation tables, dense vs pruned, prune summaries,
sweep tables in the paper's shape, and the plots of a sweep and of a run."""

from __future__ import annotations

import json
from pathlib import Path

from dietprune.io import atomic_file
from dietprune.metrics import METRICS, average, average_stderr, metric_key, paired_difference, seed_mean


def cell_name(variant: str, sparsity: float, recover: str) -> str:
    """How a sweep cell is named (its JSON file, its key in results.json)."""
    return f"{variant}-s{round(sparsity * 100):02d}-{recover}"


def _pct(value: float | None, err: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def markdown_table(results: dict) -> str:
    """Markdown table of per-task accuracies (in %, ± standard error) and the averages."""
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for task, r in results["tasks"].items():
        norm = _pct(r["acc_norm"], r["acc_norm_stderr"]) if "acc_norm" in r["metrics"] else "–"
        lines.append(f"| {task} | {r['n']} | {_pct(r['acc'], r['acc_stderr'])} | {norm} |")
    avg = results["average"]
    lines.append(f"| **average** (acc / headline score) | | {_pct(avg['acc'])} | {_pct(avg['score'])} |")
    if "perplexity" in results:
        ppl = results["perplexity"]
        lines.append(f"\nperplexity on {ppl['texts']} {ppl['corpus']} passages ({ppl['tokens']} tokens): "
                     f"{ppl['perplexity']:.2f}")
    return "\n".join(lines)


def comparison_table(dense: dict, pruned: dict[str, dict], heldout: tuple[str, ...] = ()) -> str:
    """Markdown: the profiled tasks, then the held-out ones; per task the dense acc (± standard error),
    and for each pruned model (by label) its acc and its paired difference to dense on the same
    examples (± its standard error); then the averages of both groups and perplexity."""
    header = "| task | n | dense acc |" + "".join(f" {name} acc | {name} - dense (paired) |"
                                                for name in pruned)
    lines = [header, "|---|---:|---:|" + "---:|---:|" * len(pruned)]
    groups = (("profiled", [t for t in dense["tasks"] if t not in heldout]),
              ("held out", [t for t in dense["tasks"] if t in heldout]))
    for label, tasks in groups:
        for task in tasks:
            d = dense["tasks"][task]
            row = f"| {task}{' (held out)' if label == 'held out' else ''} | {d['n']} | " \
                  f"{_pct(d['acc'], d['acc_stderr'])} |"
            for results in pruned.values():
                p = results["tasks"][task]
                delta, err = paired_difference(results, dense, [task])
                row += f" {_pct(p['acc'], p['acc_stderr'])} | {100 * delta:+.1f} ± {100 * err:.1f} |"
            lines.append(row)
    for label, tasks in groups:
        if tasks:
            row = f"| **average ({label})** | | {_pct(average(dense, tasks), average_stderr(dense, tasks))} |"
            for results in pruned.values():
                delta, err = paired_difference(results, dense, tasks)
                row += f" {_pct(average(results, tasks), average_stderr(results, tasks))} | " \
                       f"{100 * delta:+.1f} ± {100 * err:.1f} |"
            lines.append(row)
    if "perplexity" in dense and all("perplexity" in results for results in pruned.values()):
        d = dense["perplexity"]
        others = ", ".join(f"{name} {results['perplexity']['perplexity']:.2f}"
                           for name, results in pruned.items())
        lines.append(f"\nperplexity on {d['texts']} held-out {d['corpus']} passages ({d['tokens']} tokens): "
                     f"dense {d['perplexity']:.2f}, {others}")
    return "\n".join(lines)


def run_report(record: dict, dense: dict, pruned: dict[str, dict], heldout: tuple[str, ...]) -> str:
    """The report of `diet run`: what was pruned and on what, then dense vs the pruned model(s)."""
    return "\n\n".join([prune_summary_text(record), calibration_summary(record, list(dense["tasks"])),
                        comparison_table(dense, pruned, heldout)])


def calibration_summary(record: dict, evaluated: list[str]) -> str:
    """Which corpora the model was calibrated on: tasks that are also evaluated, and the user's own
    data (calibration only), with where it came from."""
    corpora = record.get("calibration", {})
    tasks = [name for name in corpora if name in evaluated]
    own = [f"{name} ({meta['source'].get('path') or 'hub:' + meta['source'].get('hub', '')}, "
           f"{len(meta['ids'])} of {meta['source'].get('rows')} rows)"
           for name, meta in corpora.items() if "source" in meta]
    lines = [f"calibrated on the tasks: {', '.join(tasks) or 'none'}"]
    if own:
        lines.append(f"calibrated on your data (never evaluated): {'; '.join(own)}")
    return "\n".join(lines)


def prune_summary(record: dict) -> dict:
    keys = ("source_model", "hidden_size_before", "hidden_size_after", "params_before", "params_after",
            "task_agreement", "seconds")
    return {key: record[key] for key in keys if key in record}


def prune_summary_text(record: dict) -> str:
    k, d = record["hidden_size_after"], record["hidden_size_before"]
    before, after = record["params_before"], record["params_after"]
    lines = [f"pruned {record['source_model']}: hidden {d} -> {k} ({1 - k / d:.1%} of dims removed)",
             f"params {before:,} -> {after:,} ({1 - after / before:.1%} fewer)"]
    if "task_agreement" in record:
        lines.append(f"per-task agreement (own top-{k} dims kept by the global mask):")
        lines += [f"  {task:<14} {n:>5} / {k}" for task, n in record["task_agreement"].items()]
    if "structure" in record:
        structure = {key: value for key, value in record["structure"].items()
                     if key.endswith(("_after", "_layers")) and key != "kept_layers"}
        lines.append(f"{record['structure']['method']}: {json.dumps(structure)}")
    if "recovery" in record:
        recovery = record["recovery"]
        parts = ", ".join(recovery["parts"])
        kept = recovery.get("mlp_channels_kept")
        channels = f", {kept} MLP channels kept a layer" if kept else ""
        lines.append(f"recovery {recovery['method']} ({parts}{channels}): {recovery['seconds']} s")
    if "disk_bytes" in record:
        lines.append(f"checkpoint: {record['disk_bytes'] / 1e6:.0f} MB in {record['saved_dtype']}")
    lines.append(f"done in {record['seconds']} s")
    return "\n".join(lines)


def tables(results: dict, variants, sparsities, recoveries) -> str:
    """Markdown in the paper's shape, once for acc and once for each task's headline score (acc_norm
    where lm-eval reports it): one block per sparsity, rows = methods, the metric per task, averages,
    and each method's paired difference to DIET (vote) on the same examples when DIET is in the sweep."""
    blocks = [metric_tables(results, variants, sparsities, recoveries, metric) for metric in METRICS]
    return "\n\n".join(blocks + [agreement_table(results)])


def agreement_table(results: dict) -> str:
    """Per hidden-dim cell and calibration corpus: how many of the corpus's own top-K dims the global
    mask keeps (K each), and which corpora were calibration only (the user's data, never evaluated)."""
    cells = {name: cell["prune"]["task_agreement"] for name, cell in results["cells"].items()
             if "task_agreement" in cell.get("prune", {})}
    if not cells:
        return ""
    corpora = list(dict.fromkeys(corpus for agreement in cells.values() for corpus in agreement))
    lines = ["## agreement with the global mask\n",
             "own top-K dims of each calibration corpus that the global mask keeps (K: the cell's width)\n",
             "| cell | K | " + " | ".join(corpora) + " |", "|---|---:|" + "---:|" * len(corpora)]
    for name, agreement in cells.items():
        k = results["cells"][name]["prune"]["hidden_size_after"]
        lines.append(f"| {name} | {k} | " + " | ".join(str(agreement.get(c, "–")) for c in corpora) + " |")
    own = [c for c in corpora if c not in results["tasks"]]
    if own:
        lines.append(f"\ncalibration only (never evaluated): {', '.join(own)}")
    return "\n".join(lines)


def metric_tables(results: dict, variants, sparsities, recoveries, metric: str) -> str:
    """The tables of one metric ("acc" or "score")."""
    heldout = results["heldout"]
    profiled = [t for t in results["tasks"] if t not in heldout]
    versus = "diet" in variants
    header = ("| method | params | " + " | ".join(profiled) + " | **avg** | " + ("avg - diet | " * versus)
              + " | ".join(f"{t} (held out)" for t in heldout) + " | ppl |")
    rule = "|---|---:|" + "---:|" * (len(profiled) + 2 + versus + len(heldout))

    def row(label: str, cell: dict, reference: dict | None) -> str:
        if "error" in cell:
            return f"| {label} | – | n/a: {cell['error']} |"
        params = cell.get("prune", {}).get("params_after")
        values = [f"{100 * cell['tasks'][t][metric_key(cell['tasks'][t], metric)]:.1f}" for t in profiled]
        held = [f"{100 * cell['tasks'][t][metric_key(cell['tasks'][t], metric)]:.1f}" for t in heldout]
        ppl = f"{cell['perplexity']['perplexity']:.1f}" if "perplexity" in cell else "–"
        avg = (f"**{100 * average(cell, profiled, metric):.1f}** ± "
               f"{100 * average_stderr(cell, profiled, metric):.1f} | ")
        if versus:
            if reference is not None and "error" not in reference and reference is not cell:
                delta, err = paired_difference(cell, reference, profiled, metric)
                avg += f"{100 * delta:+.1f} ± {100 * err:.1f} | "
            else:
                avg += "– | "
        return (f"| {label} | {f'{params / 1e6:.1f}M' if params else 'dense'} | " + " | ".join(values)
                + f" | {avg}" + " | ".join(held) + f" | {ppl} |")

    name = "acc" if metric == "acc" else "score (acc_norm where lm-eval reports it, else acc)"
    blocks = [f"## {name}\n", f"{name} (%), {results['limit']} examples per task (fewer where the split, "
              "after calibration, has fewer); avg ± its standard error"
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
                                  seed_mean(seeds, profiled + heldout, metric), reference))
        blocks.append("")
    return "\n".join(blocks)


def plot(results: dict, variants, sparsities, recoveries, png: Path) -> None:
    """Average accuracy over the profiled tasks vs sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiled = [t for t in results["tasks"] if t not in results["heldout"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = 100 * average(results["cells"]["dense"], profiled)
    ax.axhline(dense, color="black", ls=":", label="dense")
    for variant in variants:
        for recover in recoveries:
            ys = [100 * average(results["cells"][cell_name(variant, s, recover)], profiled)
                  for s in sparsities]
            ax.plot([100 * s for s in sparsities], ys, marker="o", ls="-" if recover == "none" else "--",
                    label=variant + ("" if recover == "none" else f" + {recover}"))
    ax.set(xlabel="sparsity (% of hidden dims removed)", ylabel="average acc (%)",
           title=f"{len(profiled)}-task average, {results['limit']} examples per task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run_plot(models: dict[str, dict], heldout: tuple[str, ...], png: Path) -> None:
    """Per-task accuracy (± standard error) of each model of a run side by side, then the average over
    the profiled tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(models.values()))
    tasks = list(first["tasks"])
    profiled = [t for t in tasks if t not in heldout]
    groups = [*tasks, "avg"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(groups), 3.6))
    for i, (label, results) in enumerate(models.items()):
        ys = [100 * results["tasks"][t]["acc"] for t in tasks] + [100 * average(results, profiled)]
        errs = [100 * results["tasks"][t]["acc_stderr"] for t in tasks] + [
            100 * average_stderr(results, profiled)]
        ax.bar([g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))], ys, width, yerr=errs,
               capsize=2, label=label)
    ax.set_xticks(range(len(groups)),
                  [f"{g}\n(held out)" if g in heldout else g for g in groups], fontsize=7)
    ax.set(ylabel="acc (%)", ylim=(0, 100), title=f"{first['tasks'][tasks[0]]['n']} examples per task; "
           f"avg = {len(profiled)} profiled tasks")
    ax.legend(fontsize=7, loc="upper center", ncol=len(models))
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
