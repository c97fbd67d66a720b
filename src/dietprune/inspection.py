"""`diet inspect`: what a score file or a pruned model holds, as text, JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dietprune.errors import DietError
from dietprune.io import atomic_file, read_json
from dietprune.merge import normalised, task_votes
from dietprune.scores import load_scores


def inspect_scores(path: Path, k: int | None, aggregation: str = "l1", top: int = 10) -> dict:
    """Per-task token counts, top dims, and the overlap of per-task top-K sets (K default: 80%)."""
    stats, meta = load_scores(path)
    tasks = list(stats)
    scores = torch.stack([stats[t].score(aggregation) for t in tasks])
    k = k or round(0.8 * scores.shape[1])
    votes = task_votes(scores, k)
    overlap = (votes.double() @ votes.double().T).long().tolist()
    mean = normalised(scores).mean(0)
    return {
        "path": str(path), "model": meta.get("model"), "hidden_size": scores.shape[1], "k": k,
        "site": meta.get("settings", {}).get("site"), "aggregation": aggregation,
        "tokens": {t: stats[t].tokens for t in tasks},
        "top_dims": {"all (mean normalised)": mean.argsort(descending=True)[:top].tolist()}
        | {t: scores[i].argsort(descending=True)[:top].tolist() for i, t in enumerate(tasks)},
        "overlap": {t: dict(zip(tasks, row, strict=True)) for t, row in zip(tasks, overlap, strict=True)},
    }


def inspect_model(path: Path) -> dict:
    """The provenance a pruned model directory records."""
    record_path = path / "dietprune.json"
    if not record_path.is_file():
        raise DietError(f"{path} has no dietprune.json; it is not a model pruned by dietprune")
    record = read_json(record_path, "record of a pruned model")
    keys = ("source_model", "hidden_size_before", "hidden_size_after", "params_before", "params_after",
            "prune", "task_agreement", "structure", "recovery")
    return {"path": str(path)} | {key: record.get(key) for key in keys}


def plot_scores(path: Path, png: Path, aggregation: str = "l1") -> None:
    """Sorted normalised score curves per task: where the mass is, and how alike tasks are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats, meta = load_scores(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, s in stats.items():
        score = s.score(aggregation)
        ax.plot((score / score.mean()).sort(descending=True).values.numpy(), label=task, lw=1)
    site = meta.get("settings", {}).get("site")
    ax.set(xlabel="dimension rank", ylabel="score / mean score", yscale="log",
           title=f"{meta.get('model')}: per-task {aggregation} scores ({site})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def render(report: dict) -> str:
    """Human-readable text of either kind of report."""
    if "overlap" not in report:
        return json.dumps(report, indent=2)
    tasks = list(report["overlap"])
    lines = [f"{report['path']}: {report['model']}, hidden {report['hidden_size']}, site {report['site']}",
             "tokens: " + ", ".join(f"{t} {n}" for t, n in report["tokens"].items()),
             f"overlap of per-task top-{report['k']} sets:",
             " " * 14 + "".join(f"{t[:8]:>9}" for t in tasks)]
    lines += [f"{t:<14}" + "".join(f"{report['overlap'][t][u]:>9}" for u in tasks) for t in tasks]
    lines += [f"top dims, {name}: {dims}" for name, dims in report["top_dims"].items()]
    return "\n".join(lines)
