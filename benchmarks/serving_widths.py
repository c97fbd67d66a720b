"""The kept width K that `--round-to auto` gives released models at 10/20/30%, and which quantised serving
paths take it: from the models' published configs (width, heads, MLP width, head_dim), no weights.

    .venv/bin/python benchmarks/serving_widths.py

Writes benchmarks/results/serving_widths.json and prints the markdown table of docs/SERVING.md. The last
column is about the widths pruning leaves alone: llama.cpp also quantises the rows of o_proj (heads x
head_dim wide) and down_proj (MLP wide), so a dense width that is not a multiple of 256 falls back there
whatever K is.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from dietprune.merge import SERVING, kept_width_record

SPARSITIES = (0.1, 0.2, 0.3)
# name: hidden size, attention heads, MLP width, head_dim (each model's config.json)
MODELS = {
    "Gemma-3 270M": (640, 4, 2048, 256),
    "SmolLM2-135M": (576, 9, 1536, 64),
    "Gemma-2 2B": (2304, 8, 9216, 256),
    "Gemma-2 9B": (3584, 16, 14336, 256),
    "Llama-3 8B": (4096, 32, 14336, 128),
    "Llama-3 70B": (8192, 64, 28672, 128),
    "Mistral 7B": (4096, 32, 14336, 128),
    "Qwen2.5-7B": (3584, 28, 18944, 128),
    "Qwen2.5-0.5B": (896, 14, 4864, 64),
}
SHORT = {"llama.cpp k-quants": "k-quants", "vLLM Marlin": "Marlin", "llama.cpp Q8_0/Q5_0/Q4_0": "Q8_0",
         "vLLM RMSNorm vectorised": "RMSNorm"}


def accepts(width: int) -> str:
    """The serving paths whose alignment `width` meets, shortest name first ("none" if none)."""
    names = [SHORT[name] for name, step in SERVING.items() if width % step == 0]
    return "all" if len(names) == len(SERVING) else ", ".join(names) or "none"


def main() -> None:
    rows = []
    for name, (width, heads, mlp, head_dim) in MODELS.items():
        config = SimpleNamespace(hidden_size=width, num_attention_heads=heads)
        rows.append({"model": name, "width": width, "heads": heads, "mlp": mlp, "attention": heads * head_dim,
                     "kept": {s: kept_width_record(config, s, None) for s in SPARSITIES}})
    out = Path("benchmarks/results/serving_widths.json")
    out.write_text(json.dumps({"tolerance_points": 2.5, "serving": SERVING, "rows": rows}, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| model | width / heads (dense takes) | " + " | ".join(f"K at {s:.0%}" for s in SPARSITIES)
             + " | o_proj, down_proj rows |", "|---|---|" + "---|" * len(SPARSITIES) + "---|"]
    for row in rows:
        cells = [f"**{r['kept']}** ({r['sparsity']:.1%}): {accepts(r['kept'])}" for r in row["kept"].values()]
        others = all(w % 256 == 0 for w in (row["mlp"], row["attention"]))
        lines.append(f"| {row['model']} | {row['width']} / {row['heads']} ({accepts(row['width'])}) | "
                     + " | ".join(cells) + f" | {row['attention']}, {row['mlp']}: "
                     + ("256-aligned |" if others else "**not** 256-aligned |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
