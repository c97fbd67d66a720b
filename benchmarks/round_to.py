"""Effect of `--round-to` on the real speedup: prune one model at one sparsity with several roundings
(from the same scores) and measure each against the dense model.

    .venv/bin/python benchmarks/round_to.py [--model gemma-3-270m] [--sparsity 0.22] [--repeats 7]

The dense model is measured before and after the pruned ones: the spread of those two runs is the noise
floor of the comparison. K is rounded to a multiple of lcm(round_to, attention heads); a rounding that
leaves no K within 2.5 points of the sparsity is reported as such. Writes
benchmarks/results/round_to-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dietprune.api import profile, prune, save
from dietprune.bench import SPEEDUP_METRICS, measure_in_subprocess, speedups
from dietprune.errors import DietError
from dietprune.models.load import resolve
from dietprune.scores import save_scores
from dietprune.settings import PruneSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--sparsity", type=float, default=0.22)
    parser.add_argument("--roundings", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/round_to-{args.model}.json")
    dense_path = resolve(args.model).path
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(tmp) / "scores.safetensors"
        save_scores(scores, *profile(args.model))
        pruned = {}
        for round_to in args.roundings:
            path = Path(tmp) / f"r{round_to}"
            try:
                result = prune(args.model, settings=PruneSettings(sparsity=args.sparsity, round_to=round_to),
                               scores=scores, in_place=True)
                save(result, path)
                record = result.record
            except DietError as exc:
                rows.append({"round_to": round_to, "error": str(exc)})
                continue
            pruned[round_to] = (path, record)
        dense_runs = [measure_in_subprocess(dense_path, args.repeats, "auto", "auto")]
        for round_to, (path, record) in pruned.items():
            run = measure_in_subprocess(str(path), args.repeats, "auto", "auto")
            rows.append({"round_to": round_to, "hidden_size": record["hidden_size_after"],
                         "params": record["params_after"], "pruned": run})
            print(json.dumps({"round_to": round_to, "k": record["hidden_size_after"]}), flush=True)
        dense_runs.append(measure_in_subprocess(dense_path, args.repeats, "auto", "auto"))
    dense = {m: sum(r[m] for r in dense_runs) / len(dense_runs) for m in SPEEDUP_METRICS} | {
        flops: dense_runs[0][flops] for flops in SPEEDUP_METRICS.values()}
    noise = {m: abs(dense_runs[-1][m] / dense_runs[0][m] - 1) for m in SPEEDUP_METRICS}
    for row in rows:
        if "pruned" in row:
            row["speedup"] = speedups(dense, row["pruned"])
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "sparsity": args.sparsity, "repeats": args.repeats,
              "dense_runs": dense_runs, "dense_drift": noise, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows, noise))


def table(rows: list[dict], noise: dict) -> str:
    lines = ["| round-to | K | prefill b1 | prefill b8 | decode b1 |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['round_to']} | – | {row['error']} | | |")
            continue
        cells = [f"{s['measured']:.2f}x / {s['ideal']:.2f}x = {s['ratio']:.2f}"
                 for s in row["speedup"].values()]
        lines.append(f"| {row['round_to']} | {row['hidden_size']} | " + " | ".join(cells) + " |")
    drift = " | ".join(f"{100 * noise[m]:.1f}%" for m in SPEEDUP_METRICS)
    lines.append(f"| dense drift (first vs last run) | | {drift} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
