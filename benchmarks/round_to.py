"""Effect of `--round-to` on the real speedup: prune one model at one sparsity with rounding 1, 8 and 64
(from the same scores), then `diet bench` each against the dense model.

    .venv/bin/python benchmarks/round_to.py [--model gemma-3-270m] [--sparsity 0.22]

K is rounded to a multiple of lcm(round_to, attention heads); a rounding that leaves no valid K is
reported as such. Writes benchmarks/results/round_to-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dietprune.api import ProfileSettings, PruneSettings, profile_tasks, prune
from dietprune.bench import bench
from dietprune.errors import DietError
from dietprune.models.load import load_model, resolve
from dietprune.scores import save_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--sparsity", type=float, default=0.22)
    parser.add_argument("--roundings", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/round_to-{args.model}.json")
    dense = resolve(args.model).path
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(tmp) / "scores.safetensors"
        model, tokenizer, source = load_model(args.model)
        stats, meta = profile_tasks(model, tokenizer, source, ProfileSettings())
        save_scores(scores, stats, meta)
        del model
        for round_to in args.roundings:
            pruned = Path(tmp) / f"r{round_to}"
            try:
                record = prune(args.model, pruned, PruneSettings(sparsity=args.sparsity, round_to=round_to),
                               scores_path=scores).record
            except DietError as exc:
                rows.append({"round_to": round_to, "error": str(exc)})
                continue
            result = bench(dense, str(pruned), args.repeats)
            rows.append({"round_to": round_to, "hidden_size": record["hidden_size_after"],
                         "params": record["params_after"], "speedup": result["speedup"],
                         "dense": result["dense"], "pruned": result["pruned"]})
            print(json.dumps({"round_to": round_to, "k": record["hidden_size_after"]} | {
                m: round(s["ratio"], 3) for m, s in result["speedup"].items()}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "sparsity": args.sparsity, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| round-to | K | prefill b1 | prefill b8 | decode b1 |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['round_to']} | – | {row['error']} | | |")
            continue
        cells = [f"{s['measured']:.2f}x / {s['ideal']:.2f}x = {s['ratio']:.2f}"
                 for s in row["speedup"].values()]
        lines.append(f"| {row['round_to']} | {row['hidden_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
