"""Recovery before and after the sequential engine, paired: the default `diet prune` (profile, vote, slice,
full recovery) of each embedded model by the code at a reference commit and by this checkout, one after
the other in their own processes under /usr/bin/time -v, each saving float32 so the checkpoints can be
compared exactly; then the logits of the two checkpoints on fixed prompts.

    .venv/bin/python benchmarks/recovery_speed.py                       # this CPU's own kernels
    .venv/bin/python benchmarks/recovery_speed.py --isa avx2            # torch told to use AVX2 only

`--isa avx2` sets ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2: on an AVX-512 machine this
approximates an AVX2-only one (the figures say which was used). The reference is checked out into a
temporary git worktree (default: 2eacd34, the last commit before the engine). Results are appended to
benchmarks/results/recovery_speed.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dietprune.device import machine

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "recovery_speed.json"
PROMPTS = ["The capital of France is Paris, and the capital of Germany is",
           "Question: is the sky blue?\nAnswer:",
           "In my palm is a clear stone, and inside it is a small ivory statuette."]


def prune(source: Path, model: str, out: Path, env: dict) -> dict:
    """One default prune in its own process: wall time, peak RSS, and its record."""
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "dietprune.cli", "--quiet", "prune", "--model",
            model, "--out", str(out), "--save-dtype", "float32", "--json"]
    started = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, cwd=source.parent, check=True,
                         env=env | {"PYTHONPATH": str(source)})
    record = json.loads((out / "dietprune.json").read_text())
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) * 1024
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_bytes": peak,
            "load_average_1min_after": os.getloadavg()[0],
            "recovery_s": record["recovery"]["seconds"], "prune_s": record["seconds"],
            "kept_dims": record["kept_dims"]}


@torch.no_grad()
def logit_difference(a: Path, b: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(a)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    logits = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(**batch).logits[real]
              for p in (a, b)]
    return {"max_abs": (logits[0] - logits[1]).abs().max().item(), "max_logit": logits[0].abs().max().item(),
            "relative": ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item(),
            "argmax_equal": (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--reference", default="2eacd34", help="the commit to compare against")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.isa == "avx2":
        env |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    rows = json.loads(OUT.read_text()) if OUT.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.reference], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            for model in args.models:
                outs = {name: Path(tmp) / f"{name}-{model}" for name in ("before", "after")}
                runs = {name: prune(src, model, outs[name], env)
                        for name, src in (("before", reference / "src"), ("after", ROOT / "src"))}
                row = {"model": model, "isa": args.isa, "reference": args.reference, "machine": machine(),
                       "date": time.strftime("%Y-%m-%d"), **runs,
                       "same_kept_dims": runs["before"].pop("kept_dims") == runs["after"].pop("kept_dims"),
                       "recovery_ratio": round(runs["after"]["recovery_s"] / runs["before"]["recovery_s"], 3),
                       "logits": logit_difference(outs["before"], outs["after"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=False)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
