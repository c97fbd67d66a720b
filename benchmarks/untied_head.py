"""The linear head refit on an untied head, with real weights: fitted last, on the pruned model's own
final states, with no change to the embedding and no extra pass (head_refit.py).

No untied model is installed offline, so each embedded model is untied by copying its embedding into its
head (the dense model computes what it did, checked on a prompt), pruned to 20% with the default's
recovery and each head refit (`--recover-head gains` and `linear`), and scored by LAMBADA perplexity on
quality.py's test passages (the last 256). The untied pruned models carry a second vocabulary matrix
(Gemma-3 270M: +134M parameters at K 512): this measures the refit, not a model to ship at that size.
The tied models' figures for the same two refits are quality.py's (docs/RESULTS.md, ninth round).

    .venv/bin/python benchmarks/untied_head.py [--models gemma-3-270m smollm2-135m] [--heads gains linear]
                                               [--tasks]
    -> benchmarks/results/untied_head.json (rows of earlier runs for other models or heads are kept)

`--tasks`: also quality.py's test split (the 7 profiled tasks and the 5 held out, 300 examples each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from dietprune.api import load, prune
from dietprune.evaluate import perplexity
from dietprune.models.edit import count_params


def untied(name: str):
    """The embedded model `name` with its head a copy of its embedding, no longer tied."""
    loaded = load(name)
    model = loaded.model
    batch = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        model.get_output_embeddings().weight = nn.Parameter(
            model.get_input_embeddings().weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        assert torch.equal(model(**batch).logits, before)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--heads", nargs="+", choices=("gains", "linear"), default=["gains", "linear"])
    parser.add_argument("--tasks", action="store_true", help="also the tasks of quality.py's test split")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/untied_head.json"))
    args = parser.parse_args()
    from quality import measure  # benchmarks/ is on the path of a script run from it

    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    rows = {(row["model"], row["recover_head"]): row for row in old}
    for name in args.models:
        for head in args.heads:
            pruned = prune(untied(name), sparsity=0.2, recover_head=head)
            assert not pruned.model.config.tie_word_embeddings
            row = {"model": name, "head": "untied", "recover_head": head, "sparsity": 0.2,
                   "params_after": count_params(pruned.model),
                   "recovery_seconds": pruned.record["recovery"]["seconds"],
                   "perplexity": perplexity(pruned.model, pruned.tokenizer, progress=True)}
            if args.tasks:
                row["tasks"] = measure(pruned.model, pruned.tokenizer, "test", pruned.record, True, True,
                                       {"perplexity": row["perplexity"]["perplexity"], "tasks": {}})["tasks"]
            print(json.dumps({k: v for k, v in row.items() if k != "tasks"}), flush=True)
            rows[name, head] = row
            args.out.write_text(json.dumps(list(rows.values()), indent=1) + "\n")


if __name__ == "__main__":
    main()
