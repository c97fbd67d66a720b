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

from dietprune.calibration import task_corpus, token_batches
from dietprune.models.load import load_model
from dietprune.profile import profile
from dietprune.settings import CalibrationSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_overhead.json"))
    args = parser.parse_args()
    model, tokenizer, source = load_model(args.model)
    texts = task_corpus(args.task, CalibrationSettings()).texts
    encoded = sorted((tokenizer(t)["input_ids"] for t in texts), key=len, reverse=True)

    def plain() -> None:  # the same tokenization, batching and forward passes, without hooks
        with torch.inference_mode():
            for batch in token_batches(tokenizer, texts, batch_size=8, max_length=1024):
                model.get_decoder()(**batch, use_cache=False)

    def hooked() -> None:
        profile(model, tokenizer, texts, batch_size=8, desc="hooked")

    plain()  # warm-up
    timings = {"plain": [], "hooked": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both alike
        for name, fn in (("plain", plain), ("hooked", hooked)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    plain_s, hooked_s = (statistics.median(timings[k]) for k in ("plain", "hooked"))
    result = {"model": source.name, "task": args.task, "texts": len(texts),
              "tokens": sum(map(len, encoded)), "plain_s": plain_s, "hooked_s": hooked_s,
              "overhead": hooked_s / plain_s - 1, "timings": timings,
              "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "tokens", "plain_s", "hooked_s", "overhead")}))


if __name__ == "__main__":
    main()
