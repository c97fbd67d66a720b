"""Peak memory of `diet prune` relative to the model's weight bytes, for the plain slice (the paper's,
`--recover none`) and the default (with full recovery): the embedded Gemma-3 270M, and randomly
initialised Gemma-3 models shaped like Gemma-3 1B and like Gemma-2 2B (same code path; random weights
are enough to measure memory), to show how the ratio behaves once weights dominate the process.

    .venv/bin/python benchmarks/prune_memory.py [--models embedded 1b 2b] [--recover none full]
    .venv/bin/python benchmarks/prune_memory.py --configs NAME ...   # quality.py's configurations, 20%

Rows not measured in this run are kept from the previous results file.

Each prune runs in its own process under `/usr/bin/time -v` (peak RSS = "Maximum resident set size"),
with a fresh score cache. The shaped models profile 8 samples per task, and with recovery 2 samples per
task for both profiling and recovery (memory, not accuracy: a 2-core CPU runs a 2.6B model slowly). The
process baseline (Python + torch + transformers imported, tokenizer loaded) is measured separately.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

SHAPES = {
    "1b": ("gemma-3-1b-shaped (random weights)",
           {"hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}),
    "2b": ("gemma-2-2b-shaped (random weights)",
           {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}),
}

RANDOM_MODEL = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(sys.argv[1])
"""

BASELINE = """
import sys, torch, transformers
import dietprune.api
transformers.AutoTokenizer.from_pretrained(sys.argv[1])
"""


def timed(argv: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """(peak RSS in bytes, wall time, stdout) of a command run under /usr/bin/time -v (which, unlike
    getrusage in a child of this process, does not inherit this process's peak)."""
    run = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env, check=True)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr)[1]
    return peak, wall, run.stdout


def peak_rss_of_prune(model: str, out: Path, cache: Path, options: list[str]) -> dict:
    argv = [sys.executable, "-m", "dietprune.cli", "--quiet", "prune", "--model", model, "--out", str(out),
            *options, "--json"]
    peak, wall, stdout = timed(argv, os.environ | {"DIETPRUNE_CACHE": str(cache)})
    return {"peak_rss_bytes": peak, "wall": wall, "summary": json.loads(stdout)}


def measure_config(name: str, model_dir: Path, work: Path) -> dict:
    """The embedded model pruned by quality.py's configuration `name` (its options as a config file),
    at 20%, with a fresh cache: the cost beside that configuration's accuracy in docs/RESULTS.md."""
    from quality import CONFIGS  # benchmarks/ is on the path of a script run from it

    from dietprune.settings import CalibrationSettings, PruneSettings

    options = dict(CONFIGS[name])
    known = {f.name for group in (PruneSettings, CalibrationSettings) for f in fields(group)}
    if not options.keys() <= known:
        raise SystemExit(f"{name} is not a plain prune (quality.py prunes it its own way)")
    config = work / f"{name}.json"
    config.write_text(json.dumps(options))
    cache = work / f"cache-{name}"
    (cache / "models").mkdir(parents=True)
    result = peak_rss_of_prune(str(model_dir), work / f"pruned-{name}", cache, ["--config", str(config)])
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"model": "gemma-3-270m", "config": name, "options": options, "weight_bytes": weights, **result,
            "peak_over_weights": result["peak_rss_bytes"] / weights}


def measure(name: str, model_dir: Path, work: Path, recover: str, samples: int, recover_samples: int = 32
            ) -> dict:
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    baseline = timed([sys.executable, "-c", BASELINE, str(model_dir)])[0]
    cache = work / f"cache-{name}-{recover}"
    (cache / "models").mkdir(parents=True)
    options = ["--recover", recover, "--samples", str(samples), "--recover-samples", str(recover_samples)]
    result = peak_rss_of_prune(str(model_dir), work / f"pruned-{name}-{recover}", cache, options)
    peak = result["peak_rss_bytes"]
    return {"model": name, "recover": recover, "samples": samples,
            "recover_samples": recover_samples if recover != "none" else 0, "weight_bytes": weights,
            "baseline_rss_bytes": baseline, **result, "peak_over_weights": peak / weights,
            "peak_minus_baseline_over_weights": (peak - baseline) / weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("embedded", *SHAPES), default=["embedded", *SHAPES])
    parser.add_argument("--recover", nargs="+", choices=("none", "full"), default=["none", "full"])
    parser.add_argument("--configs", nargs="+", default=[], help="instead, the embedded model pruned by "
                        "these configurations of benchmarks/quality.py")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_memory.json"))
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from dietprune.models.load import resolve

    embedded = Path(resolve("gemma-3-270m").path)
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    rows = {(row["model"], row.get("config") or row.get("recover", "none")): row for row in old}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.configs:
            row = rows["gemma-3-270m", name] = measure_config(name, embedded, work)
            print(json.dumps(row), flush=True)
        if args.configs:
            args.models = []
        if "embedded" in args.models:
            for recover in args.recover:
                row = rows["gemma-3-270m", recover] = measure("gemma-3-270m", embedded, work, recover, 100)
                print(json.dumps(row), flush=True)
        for key in (m for m in args.models if m in SHAPES):
            name, shape = SHAPES[key]
            config = AutoConfig.from_pretrained(embedded)
            for field, value in shape.items():
                setattr(config, field, value)
            config.layer_types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                  for i in range(config.num_hidden_layers)]
            big = work / key
            config.save_pretrained(big)
            subprocess.run([sys.executable, "-c", RANDOM_MODEL, str(big)], check=True)  # its memory goes
            AutoTokenizer.from_pretrained(embedded).save_pretrained(big)
            for recover in args.recover:
                samples = (8,) if recover == "none" else (2, 2)
                row = rows[name, recover] = measure(name, big, work, recover, *samples)
                print(json.dumps(row), flush=True)
            shutil.rmtree(big)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(list(rows.values()), indent=1) + "\n")


if __name__ == "__main__":
    main()
