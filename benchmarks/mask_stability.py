"""Stability of the DIET mask under the calibration draw: for each number of samples per task, the masks
from several seeds, and how many of their K kept dims they share.

    .venv/bin/python benchmarks/mask_stability.py [--model gemma-3-270m] [--samples 10 50 100 200]

Per (samples, sparsity): the mean and the smallest overlap |A & B| / K over all seed pairs, and the mean
overlap with the default mask (100 samples, seed 0). Profiles are cached like `diet profile`'s. Writes
benchmarks/results/mask_stability-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from dietprune.api import load, profile
from dietprune.merge import kept_width, kept_width_step, merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--round-to", type=int, default=None, help="default: auto, as diet prune")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/mask_stability-{args.model}.json")
    loaded = load(args.model)
    config = loaded.model.config
    ks = {s: kept_width(config.hidden_size, s, kept_width_step(config, s, args.round_to))
          for s in args.sparsities}
    masks: dict[tuple[int, int, float], set[int]] = {}
    for samples, seed in {*itertools.product(args.samples, args.seeds), (100, 0)}:
        stats, _ = profile(loaded, samples=samples, seed=seed)
        matrix = torch.stack([s.score() for s in stats.values()])
        for sparsity in args.sparsities:
            masks[samples, seed, sparsity] = set(merge(matrix, ks[sparsity]).tolist())
    rows = []
    for samples, sparsity in itertools.product(args.samples, args.sparsities):
        k = ks[sparsity]
        pairs = [len(masks[samples, a, sparsity] & masks[samples, b, sparsity]) / k
                 for a, b in itertools.combinations(args.seeds, 2)]
        to_default = [len(masks[samples, s, sparsity] & masks[100, 0, sparsity]) / k for s in args.seeds]
        rows.append({"samples": samples, "sparsity": sparsity, "k": k,
                     "seed_pairs_mean": sum(pairs) / len(pairs), "seed_pairs_min": min(pairs),
                     "to_default_mean": sum(to_default) / len(to_default)})
        print(json.dumps(rows[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| samples/task | sparsity | K | overlap between seeds, mean (min) | overlap with default |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['samples']} | {r['sparsity']:.0%} | {r['k']} | {r['seed_pairs_mean']:.3f} "
                     f"({r['seed_pairs_min']:.3f}) | {r['to_default_mean']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
