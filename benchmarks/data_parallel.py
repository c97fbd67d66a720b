"""The default prune data parallel against one process, on real weights: `torchrun --nproc-per-node N
-m dietprune.cli prune` against `diet prune`, each with a fresh score cache (both profile and refit),
under `/usr/bin/time -v`. Reports wall time, peak RSS (of the largest process), and how far the two
checkpoints are apart: per tensor, max |a - b| / max |a|, and on LAMBADA passages the logits' largest
difference relative to their range and the share of positions whose top-1 token agrees.

    .venv/bin/python benchmarks/data_parallel.py [--model gemma-3-270m] [--processes 2]

On this repository's 2-core CPU the processes share the same two cores (one thread each, torchrun's
default, against two threads for one process), so the wall times say what the collectives cost, not a
speed-up; on N GPUs each process refits on 1/N of the calibration texts. Results:
benchmarks/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
from prune_memory import timed  # benchmarks/ is on the path of a script run from it
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def logits_apart(one: Path, two: Path, passages: int) -> dict:
    """The two checkpoints' logits on the last `passages` LAMBADA passages (256 tokens at most; the
    perplexity passages, which recovery never sees)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dietprune.tasks.data import lambada_passages

    tokenizer = AutoTokenizer.from_pretrained(one)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (one, two)]
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for _, text in lambada_passages()[-passages:]:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            a, b = (m(ids).logits[0] for m in models)
            worst = max(worst, float((a - b).abs().max() / (a.max() - a.min())))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    return {"passages": passages, "positions": total, "max_logit_difference_over_range": worst,
            "top1_agreement": agree / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--passages", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_parallel.json"))
    args = parser.parse_args()
    from dietprune.device import machine
    from dietprune.models.load import resolve

    model = resolve(args.model).path  # converted once, outside the timed runs
    work = Path(tempfile.mkdtemp(prefix="data-parallel-"))
    prune = ["--quiet", "prune", "--model", model]
    runs = {"single": [sys.executable, "-m", "dietprune.cli", *prune, "--out", str(work / "single")],
            "data_parallel": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                              str(args.processes), "--master-port", str(free_port()), "-m", "dietprune.cli",
                              *prune, "--out", str(work / "data_parallel")]}
    result = {"model": args.model, "processes": args.processes, "machine": machine()}
    for name, argv in runs.items():
        peak, wall, _ = timed(argv, os.environ | {"DIETPRUNE_CACHE": str(work / f"cache-{name}")})
        record = json.loads((work / name / "dietprune.json").read_text())
        result[name] = {"wall": wall, "peak_rss_bytes": peak, "kept_dims": record["kept_dims"],
                        "recovery_seconds": record["recovery"]["seconds"]}
        print(name, wall, f"{peak / 2**30:.2f} GiB", flush=True)
    one, two = tensors(work / "single"), tensors(work / "data_parallel")
    apart = {k: float((one[k] - two[k]).abs().max() / one[k].abs().max()) for k in one}
    worst = max(apart, key=apart.get)
    result |= {"same_mask": result["single"]["kept_dims"] == result["data_parallel"]["kept_dims"],
               "worst_tensor": worst, "worst_tensor_difference_over_max": apart[worst],
               "median_tensor_difference_over_max": sorted(apart.values())[len(apart) // 2],
               "logits": logits_apart(work / "single", work / "data_parallel", args.passages)}
    for name in runs:
        del result[name]["kept_dims"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
