"""Profiling cost: forward passes with dietprune's hooks vs plain forward passes on the same batches.

Usage: python benchmarks/profile_overhead.py [MODEL] [--out FILE]. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dietprune.calibration import Batching, task_corpus, token_batches
from dietprune.models.load import load_model
from dietprune.profile import profile
from dietprune.sequential import Weights
from dietprune.settings import CalibrationSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_overhead.json"))
    args = parser.parse_args()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    corpus = task_corpus(args.task, CalibrationSettings())
    texts = corpus.texts
    batching = Batching(8, 1024, 4096)
    encoded = sorted((tokenizer(t)["input_ids"] for t in texts), key=len, reverse=True)

    def plain() -> None:  # the same tokenization, batching and forward passes, without hooks
        with torch.inference_mode():
            for batch in token_batches(tokenizer, texts, batching):
                model.get_decoder()(**batch, use_cache=False)

    def hooked() -> None:  # the sequential engine: captured stream, blocks one at a time, taps
        profile(Weights.of(model), tokenizer, [corpus], ("block_output",), batching, desc="profile")

    plain()  # warm-up
    timings = {"plain": [], "hooked": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both alike
        for name, fn in (("plain", plain), ("hooked", hooked)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    plain_s, hooked_s = (statistics.median(timings[k]) for k in ("plain", "hooked"))
    result = {"model": loaded.name, "task": args.task, "texts": len(texts),
              "tokens": sum(map(len, encoded)), "plain_s": plain_s, "hooked_s": hooked_s,
              "overhead": hooked_s / plain_s - 1, "timings": timings,
              "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "tokens", "plain_s", "hooked_s", "overhead")}))


if __name__ == "__main__":
    main()
