"""How far each hidden-dim variant of `diet sweep` moves the mask away from DIET's: which ablations can
change accuracy at all, before paying for their evaluation.

    .venv/bin/python benchmarks/mask_overlap.py [--model gemma-3-270m] [--sparsities 0.05 0.1 0.2 0.3 0.5]

Each variant's mask is chosen exactly as `diet sweep` chooses it (same settings, same cached profiles).
Per (variant, sparsity): K and the number of kept dims not in DIET's mask. Writes
benchmarks/results/mask_overlap-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dietprune.api import load
from dietprune.merge import kept_width, kept_width_step
from dietprune.methods import METHODS, VARIANTS
from dietprune.pipeline import calibrate, choose_dims
from dietprune.plan import make_plan
from dietprune.sequential import Weights
from dietprune.settings import CalibrationSettings, PruneSettings, RuntimeSettings
from dietprune.sweep import variant_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/mask_overlap-{args.model}.json")
    variants = [v for v, spec in VARIANTS.items() if METHODS[spec["method"]].kind == "hidden"]
    loaded = load(args.model)
    model = loaded.model
    d = model.config.hidden_size
    rows = []
    for sparsity in args.sparsities:
        k = kept_width(d, sparsity, kept_width_step(model.config, sparsity, None))
        masks = {}
        for variant in variants:
            settings, calibration = variant_settings(variant, PruneSettings(), CalibrationSettings(),
                                                     sparsity)
            plan = make_plan(model.config, settings, calibration, RuntimeSettings(), loaded.stored_dtype,
                             home=torch.device("cpu"), dtype=model.dtype)
            seen = calibrate(Weights(model, plan.device, plan.dtype), loaded.tokenizer, plan, {})
            stats = plan.method.scores(seen, plan.settings)
            masks[variant] = set(choose_dims(stats, k, settings)[0].tolist())
        rows += [{"variant": v, "sparsity": sparsity, "k": k, "not_in_diet": len(masks[v] - masks["diet"])}
                 for v in variants]
        print(json.dumps(rows[-len(variants):]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "hidden_size": d, "rows": rows}, indent=1) + "\n")
    print(table(rows, args.sparsities))


def table(rows: list[dict], sparsities: list[float]) -> str:
    """Rows = variants, columns = sparsities (K), cells = kept dims not in DIET's mask."""
    by = {(r["variant"], r["sparsity"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | " + " | ".join(f"{s:.0%} (K={by['diet', s]['k']})" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities)]
    lines += [f"| {v} | " + " | ".join(str(by[v, s]["not_in_diet"]) for s in sparsities) + " |"
              for v in variants]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
