"""How far bfloat16 log-likelihoods are from float32 ones, and whether a bf16 pass with float32 re-scoring
of the close calls could be faster than float32 with the same predictions.

    .venv/bin/python benchmarks/bf16_error.py [--model gemma-3-270m] [--limit 60]

Per task: the largest |bf16 - fp32| log-likelihood gap of a choice, of the difference between two
choices (what decides a prediction), and per continuation token; predictions that differ. Then, for a
per-token error bound t, the examples whose bf16 margin (acc or acc_norm) is within the bound, which a
draft scheme would re-score in fp32, and its estimated time (bf16 pass + fp32 re-scores) against fp32.
Writes benchmarks/results/bf16_error-<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from dietprune.engine import _encode_requests
from dietprune.evaluate import score_examples, select_examples
from dietprune.metrics import predictions
from dietprune.models.load import load_model
from dietprune.tasks import DEFAULT_TASKS

BOUNDS = (0.05, 0.1, 0.2)  # nats per continuation token


def could_flip(lls: np.ndarray, n_tokens: np.ndarray, lengths: np.ndarray, bound: float) -> bool:
    """Could errors of up to bound x tokens per choice change the acc or acc_norm prediction?"""
    err = bound * n_tokens
    for scores, e in ((lls, err), (lls / lengths, err / lengths)):
        best = int(np.argmax(scores))
        others = np.arange(len(scores)) != best
        if np.any(scores[best] - scores[others] <= e[best] + e[others]):
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/bf16_error-{args.model}.json")
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    draft = copy.deepcopy(model).to(torch.bfloat16)
    report = {"model": args.model, "limit": args.limit, "tasks": {}, "draft": {}}
    for task in (*DEFAULT_TASKS, "piqa"):
        examples = select_examples(task, args.limit)
        times, scores = {}, {}
        for name, m in (("float32", model), ("bfloat16", draft)):
            start = time.perf_counter()
            scores[name] = score_examples(m, tokenizer, examples)
            times[name] = time.perf_counter() - start
        requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations, strict=True)]
        tokens = iter([len(cont) for _, cont in _encode_requests(tokenizer, requests)])
        gaps, pair_gaps, per_token, flips, rows = [], [], [], 0, []
        for ex, exact, fast in zip(examples, scores["float32"], scores["bfloat16"], strict=True):
            n = np.array([next(tokens) for _ in ex.choices], dtype=float)
            delta = np.subtract(fast, exact)
            gaps += list(np.abs(delta))
            for i, j in itertools.combinations(range(len(delta)), 2):
                pair_gaps.append(abs(delta[i] - delta[j]))
                per_token.append(abs(delta[i] - delta[j]) / (n[i] + n[j]))
            flips += predictions(ex, exact) != predictions(ex, fast)
            rows.append((np.array(fast), n, np.array([float(len(c)) for c in ex.choices])))
        report["tasks"][task] = {
            "n": len(examples), "seconds": times, "max_abs_gap": max(gaps), "max_pair_gap": max(pair_gaps),
            "max_pair_gap_per_token": max(per_token), "predictions_differ": int(flips),
            "close_calls": {str(b): sum(could_flip(*row, b) for row in rows) for b in BOUNDS}}
        print(task, json.dumps({k: v for k, v in report["tasks"][task].items() if k != "n"}), flush=True)
    tasks = report["tasks"].values()
    fp32 = sum(t["seconds"]["float32"] for t in tasks)
    for bound in BOUNDS:
        key = str(bound)
        draft_time = sum(t["seconds"]["bfloat16"] + t["close_calls"][key] / t["n"] * t["seconds"]["float32"]
                         for t in tasks)
        report["draft"][key] = {"rescored": sum(t["close_calls"][key] for t in tasks),
                                "of": sum(t["n"] for t in tasks), "speedup_over_float32": fp32 / draft_time}
    report["bf16_speedup_over_float32"] = fp32 / sum(t["seconds"]["bfloat16"] for t in tasks)
    print(json.dumps(report["draft"]), f"bf16 alone: {report['bf16_speedup_over_float32']:.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
