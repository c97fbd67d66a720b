"""Speed and agreement of our evaluator against lm-evaluation-harness's HF backend, same model and examples.

    .venv/bin/python benchmarks/eval_speed.py --limit 50 --out benchmarks/results/eval_speed.json

Per task, lm-eval runs first and ours next on the same examples (so load on the machine hits both
alike), once per `--our-dtypes` entry: a copy of the model in that dtype (as `diet eval --dtype` loads
it; log-softmax in float32), while lm-eval keeps `--dtype`. lm-eval's time is its `simple_evaluate`
call (task set-up, tokenization, model calls), ours is `score_examples` (tokenization, model calls).
CPU time (`time.process_time`) is reported too: on a shared machine it is steadier than wall time.
Agreement compares per-example predictions (acc and acc_norm); a disagreement counts as a tie when
lm-eval's own two log-likelihoods (length-normalised for acc_norm) are within `--tie-tol`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from dietprune.evaluate import score_examples, select_examples
from dietprune.lm_eval_bridge import lm_eval_loglikelihoods
from dietprune.metrics import task_result
from dietprune.models.load import load_model
from dietprune.tasks import DEFAULT_TASKS, task_metrics


def agreement(examples, ours, theirs, tie_tol: float) -> dict:
    """Counts of identical predictions, and of differences explained by float ties in lm-eval's scores."""
    out = {"same": 0, "same_norm": 0, "ties": 0, "ties_norm": 0, "max_abs_ll_diff": 0.0}
    for ex, a, b in zip(examples, ours, theirs, strict=True):
        out["max_abs_ll_diff"] = max(out["max_abs_ll_diff"], float(np.max(np.abs(np.subtract(a, b)))))
        lengths = np.array([len(c) for c in ex.choices], dtype=float)
        for suffix, sa, sb in (("", np.array(a), np.array(b)), ("_norm", a / lengths, b / lengths)):
            pa, pb = int(np.argmax(sa)), int(np.argmax(sb))
            out["same" + suffix] += pa == pb
            out["ties" + suffix] += bool(pa != pb and abs(sb[pa] - sb[pb]) <= tie_tol)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec for load_model (default: embedded)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (requests)")
    parser.add_argument("--our-batch-size", type=int, default=64, help="our batch size (rows)")
    parser.add_argument("--tie-tol", type=float, default=1e-4)
    parser.add_argument("--our-dtypes", default="float32",
                        help="our runs, each on a copy of the model in that dtype")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both backends")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_speed.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype))
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.inference_mode():  # warm-up, shared by both backends
        model(torch.tensor([tokenizer("warm up")["input_ids"]]))

    ours_models = {name: model if name == args.dtype else copy.deepcopy(model).to(getattr(torch, name))
                   for name in args.our_dtypes.split(",")}
    settings = vars(args) | {"out": str(args.out), "threads": torch.get_num_threads()}
    report = {"settings": settings, "tasks": {}}
    for task in args.tasks.split(","):
        examples = select_examples(task, args.limit)
        cpu = time.process_time()
        theirs, _, reported, lm_seconds = lm_eval_loglikelihoods(
            model, tokenizer, {task: examples}, args.batch_size
        )
        lm_cpu = time.process_time() - cpu
        ref = task_result(examples, theirs[task], task_metrics(task))
        row = {
            "n": len(examples),
            "lm_eval_seconds": lm_seconds[task],
            "lm_eval_cpu_seconds": lm_cpu,
            "lm_eval_examples_per_s": len(examples) / lm_seconds[task],
            "lm_eval": {"acc": ref["acc"], "acc_norm": ref["acc_norm"], "reported": reported[task]},
            "ours": {},
        }
        for name, ours_model in ours_models.items():
            start, cpu = time.perf_counter(), time.process_time()
            ours = score_examples(ours_model, tokenizer, examples, args.our_batch_size)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            res = task_result(examples, ours, task_metrics(task))
            mine = row["ours"][name] = {
                "seconds": seconds,
                "examples_per_s": len(examples) / seconds,
                "speedup": lm_seconds[task] / seconds,
                "cpu_seconds": cpu,
                "cpu_speedup": lm_cpu / cpu,
                "acc": res["acc"],
                "acc_norm": res["acc_norm"],
            } | agreement(examples, ours, theirs[task], args.tie_tol)
            print(f"{task:14s} n={row['n']:3d} ours[{name}] {mine['examples_per_s']:5.2f} ex/s  "
                  f"lm-eval {row['lm_eval_examples_per_s']:5.2f} ex/s  x{mine['speedup']:4.1f} "
                  f"(CPU time x{mine['cpu_speedup']:4.1f})  "
                  f"same {mine['same']}/{row['n']} (+{mine['ties']} ties), acc_norm {mine['same_norm']}/"
                  f"{row['n']} (+{mine['ties_norm']})  acc {100 * res['acc']:.1f} vs {100 * ref['acc']:.1f}",
                  flush=True)
        report["tasks"][task] = row

    rows = list(report["tasks"].values())
    n, lm_total = sum(r["n"] for r in rows), sum(r["lm_eval_seconds"] for r in rows)
    lm_cpu_total = sum(r["lm_eval_cpu_seconds"] for r in rows)
    report["total"] = {"n": n, "lm_eval_seconds": lm_total, "lm_eval_cpu_seconds": lm_cpu_total}
    for name in args.our_dtypes.split(","):
        mine = [r["ours"][name] for r in rows]
        keys = ("seconds", "cpu_seconds", "same", "same_norm", "ties", "ties_norm")
        total = {key: sum(m[key] for m in mine) for key in keys}
        total["speedup"] = lm_total / total["seconds"]
        total["cpu_speedup"] = lm_cpu_total / total["cpu_seconds"]
        report["total"][name] = total
        print(f"total[{name}]: {n} examples, ours {total['seconds']:.1f}s, lm-eval {lm_total:.1f}s, "
              f"speed-up x{total['speedup']:.1f} (CPU time x{total['cpu_speedup']:.1f}), "
              f"same predictions {total['same']}/{n} (+{total['ties']} ties), "
              f"acc_norm {total['same_norm']}/{n} (+{total['ties_norm']} ties)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
