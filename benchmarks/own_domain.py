"""Does the mask follow the user's data? (issue 15) A mask calibrated on Python source code (the standard
library that ships with this Python) against the default mask from the built-in tasks, each at the same
width with the default recovery, evaluated on both domains.

    .venv/bin/python benchmarks/own_domain.py [--sparsity 0.2] [--limit 100]

Code data: the standard library's .py files, sorted by path and split by a hash of the path into a
calibration half and a held-out half (no file in both). A sample is a 40-line chunk; calibration takes
the default 100 samples (seeded) from the calibration half's chunks, written as a JSONL file, which
`--calibration` reads like any user's file. Perplexity on held-out code: 128 chunks of the held-out
half; on prose: the last 128 LAMBADA passages (held out from all calibration); at most 256 tokens
each. Tasks: the 7 built-in tasks plus PIQA, `--limit` examples each, the same examples for every
model (the default calibration samples are excluded for all). Perplexity differences are paired per
text: the difference of mean token log-loss, with its standard error (ratio estimator over texts).
Writes benchmarks/results/own_domain-gemma-3-270m.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import tempfile
from pathlib import Path

from dietprune.api import load, prune
from dietprune.engine import continuation_logprobs
from dietprune.evaluate import evaluate, excluded_ids
from dietprune.metrics import average, average_stderr, paired_difference
from dietprune.settings import DEFAULT_TASKS, CalibrationSettings
from dietprune.tasks.data import lambada_passages

LINES, HELD_OUT_TEXTS, MAX_TOKENS = 40, 128, 256


def code_chunks() -> tuple[list[str], list[str]]:
    """(calibration chunks, held-out chunks) of the standard library's source, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    halves: tuple[list[str], list[str]] = ([], [])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "test/", "idlelib/idle_test/")):
            continue
        lines = path.read_text(errors="replace").splitlines()
        chunks = ["\n".join(lines[i:i + LINES]) for i in range(0, len(lines), LINES)]
        held_out = hashlib.sha256(relative.encode()).digest()[0] % 2
        halves[held_out].extend(c for c in chunks if len(c.strip()) > 200)
    return halves


def log_losses(model, tokenizer, texts: list[str]) -> tuple[list[float], list[int]]:
    """Per text: the summed negative log-likelihood and the number of predicted tokens."""
    ids = [t[:MAX_TOKENS] for t in tokenizer(texts)["input_ids"]]
    nll = [-x for x in continuation_logprobs(model, tokenizer, ids, progress=True)]
    return nll, [len(t) - 1 for t in ids]


def paired_log_ppl(a: tuple[list[float], list[int]], b: tuple[list[float], list[int]]) -> tuple[float, float]:
    """log ppl(a) - log ppl(b) over the same texts, and its standard error (ratio estimator)."""
    tokens = sum(a[1])
    diffs = [x - y for x, y in zip(a[0], b[0], strict=True)]
    delta = sum(diffs) / tokens
    residuals = [d - delta * n for d, n in zip(diffs, a[1], strict=True)]
    m = len(diffs)
    return delta, math.sqrt(sum(r * r for r in residuals) * m / (m - 1)) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/own_domain-gemma-3-270m.json"))
    args = parser.parse_args()
    calibration_chunks, held_out_chunks = code_chunks()
    held_out_code = random.Random(0).sample(held_out_chunks, HELD_OUT_TEXTS)
    prose = [text for _, text in lambada_passages()[-HELD_OUT_TEXTS:]]
    tasks = (*DEFAULT_TASKS, "piqa")
    exclude = excluded_ids(None, CalibrationSettings(tasks=DEFAULT_TASKS))
    dense = load("gemma-3-270m")
    results, masks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        code_file = Path(tmp) / "stdlib-code.jsonl"
        code_file.write_text("".join(json.dumps({"text": c}) + "\n" for c in calibration_chunks))
        code = (str(code_file),)
        configs = {"dense": None, "default (built-in tasks)": CalibrationSettings(),
                   "code (stdlib files)": CalibrationSettings(tasks=(), calibration=code),
                   "tasks + code": CalibrationSettings(calibration=code)}
        for name, options in configs.items():
            model = dense if options is None else prune(dense, sparsity=args.sparsity,
                                                        calibration_settings=options)
            if options is not None:
                masks[name] = set(model.record["kept_dims"])
            results[name] = evaluate(model.model, model.tokenizer, tasks, args.limit, exclude)
            results[name]["code"] = log_losses(model.model, model.tokenizer, held_out_code)
            results[name]["prose"] = log_losses(model.model, model.tokenizer, prose)
            del model
            report = {"sparsity": args.sparsity, "limit": args.limit, "code_texts": {
                "calibration_chunks": len(calibration_chunks), "held_out": HELD_OUT_TEXTS},
                "kept_overlap": {a: {b: len(masks[a] & masks[b]) for b in masks} for a in masks},
                "rows": {n: summary(results, n, "default (built-in tasks)") for n in results}}
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each model: a long run keeps
            print(table(report), flush=True)                           # what it measured


def summary(results: dict, name: str, reference: str) -> dict:
    """A model's task average, PIQA, both perplexities, and paired differences to `reference`."""
    row, ref = results[name], results.get(reference)
    profiled = list(DEFAULT_TASKS)
    out = {"avg": average(row, profiled), "avg_se": average_stderr(row, profiled),
           "piqa": row["tasks"]["piqa"]["acc"], "n_per_task": row["tasks"]["boolq"]["n"]}
    for domain in ("code", "prose"):
        nll, tokens = row[domain]
        out[f"ppl_{domain}"] = math.exp(sum(nll) / sum(tokens))
    if ref is not None and name != reference:
        out["avg_diff"], out["avg_diff_se"] = paired_difference(row, ref, profiled)
        for domain in ("code", "prose"):
            out[f"log_ppl_{domain}_diff"], out[f"log_ppl_{domain}_diff_se"] = paired_log_ppl(row[domain],
                                                                                              ref[domain])
    return out


def table(report: dict) -> str:
    lines = ["| mask | 7-task avg | - default (paired) | PIQA | ppl code | log ppl - default | ppl prose | "
             "log ppl - default |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def diff(r: dict, key: str) -> str:
        return f"{r[key]:+.3f} ± {r[key + '_se']:.3f}" if key in r else ""

    for name, r in report["rows"].items():
        avg_diff = f"{100 * r['avg_diff']:+.1f} ± {100 * r['avg_diff_se']:.1f}" if "avg_diff" in r else ""
        lines.append(f"| {name} | {100 * r['avg']:.1f} ± {100 * r['avg_se']:.1f} | {avg_diff} | "
                     f"{100 * r['piqa']:.1f} | {r['ppl_code']:.2f} | {diff(r, 'log_ppl_code_diff')} | "
                     f"{r['ppl_prose']:.1f} | {diff(r, 'log_ppl_prose_diff')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
