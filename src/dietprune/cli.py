"""The `diet` command: a thin front over dietprune.api."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers.utils import logging as transformers_logging

from dietprune import progress
from dietprune.errors import DietError


def _add_profile_options(parser: argparse.ArgumentParser) -> None:
    from dietprune.profile import SITES
    from dietprune.tasks import DEFAULT_TASKS

    group = parser.add_argument_group("profiling")
    group.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="tasks to profile")
    group.add_argument("--samples", type=int, default=100, help="calibration samples per task")
    group.add_argument("--seed", type=int, default=0, help="seed of the calibration subsets")
    group.add_argument("--site", choices=SITES, default="block_output", help="activation site")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--max-length", type=int, default=1024, help="tokens per calibration text")
    group.add_argument("--data-source", choices=("offline", "hub"), default="offline")


def _profile_settings(args: argparse.Namespace):
    from dietprune.api import ProfileSettings

    return ProfileSettings(tasks=tuple(args.tasks), samples=args.samples, seed=args.seed, site=args.site,
                           max_length=args.max_length, batch_size=args.batch_size,
                           data_source=args.data_source)


def cmd_profile(args: argparse.Namespace) -> None:
    from dietprune.api import profile_tasks
    from dietprune.io import check_output_path
    from dietprune.models.load import load_model
    from dietprune.profile import is_main_process
    from dietprune.scores import save_scores

    check_output_path(args.out, args.overwrite)
    model, tokenizer, source = load_model(args.model)
    stats, meta = profile_tasks(model, tokenizer, source, _profile_settings(args))
    if not is_main_process():
        return
    save_scores(args.out, stats, meta)
    tokens = {task: s.tokens for task, s in stats.items()}
    print(json.dumps({"out": str(args.out), "tokens": tokens}) if args.json else
          f"wrote {args.out}: {len(stats)} tasks, {sum(tokens.values())} tokens")


def _prune_settings(args: argparse.Namespace):
    from dietprune.api import PruneSettings

    per_cell = {k: getattr(args, k) for k in ("sparsity", "method", "merge", "recover") if hasattr(args, k)}
    if hasattr(args, "merge_tasks"):
        per_cell["merge_tasks"] = tuple(args.merge_tasks)
    return PruneSettings(round_to=args.round_to, aggregation=args.aggregation,
                         recover_samples=args.recover_samples, random_seed=args.random_seed, **per_cell)


def cmd_prune(args: argparse.Namespace) -> None:
    from dietprune.api import prune

    settings = _prune_settings(args)
    result = prune(args.model, args.out, settings, _profile_settings(args), args.scores, args.overwrite)
    print(json.dumps(_summary(result.record), indent=2) if args.json else _summary_text(result.record))


def _summary(record: dict) -> dict:
    keys = ("source_model", "hidden_size_before", "hidden_size_after", "params_before", "params_after",
            "task_agreement", "seconds")
    return {key: record[key] for key in keys if key in record}


def _summary_text(record: dict) -> str:
    k, d = record["hidden_size_after"], record["hidden_size_before"]
    before, after = record["params_before"], record["params_after"]
    lines = [f"pruned {record['source_model']}: hidden {d} -> {k} ({1 - k / d:.1%} of dims removed)",
             f"params {before:,} -> {after:,} ({1 - after / before:.1%} fewer)"]
    if "task_agreement" in record:
        lines.append(f"per-task agreement (own top-{k} dims kept by the global mask):")
        lines += [f"  {task:<14} {n:>5} / {k}" for task, n in record["task_agreement"].items()]
    if "structure" in record:
        structure = {key: value for key, value in record["structure"].items()
                     if key.endswith(("_after", "_layers")) and key != "kept_layers"}
        lines.append(f"{record['structure']['method']}: {json.dumps(structure)}")
    lines.append(f"done in {record['seconds']} s")
    return "\n".join(lines)


def _round_to(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return int(value)


def _dtype(name: str):
    import torch

    return None if name == "float32" else getattr(torch, name)


def cmd_eval(args: argparse.Namespace) -> None:
    from dietprune.api import evaluate_model
    from dietprune.evaluate import markdown_table
    from dietprune.io import check_output_path, write_json_atomic

    if args.out:
        check_output_path(args.out, args.overwrite)
    results = evaluate_model(args.model, tuple(args.tasks), args.limit, _profile_settings(args),
                             args.eval_batch_size, _dtype(args.dtype), args.backend, args.perplexity)
    table = markdown_table(results)
    if args.out:
        write_json_atomic(args.out, results)
        args.out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps(results["average"]) if args.json else table)


def cmd_run(args: argparse.Namespace) -> None:
    from dietprune.api import run

    settings = _prune_settings(args)
    summary = run(args.model, args.out, settings, _profile_settings(args), tuple(args.heldout), args.limit,
                  _dtype(args.dtype), args.overwrite)
    if args.json:
        averages = {name: summary[name]["average"] for name in ("dense", "pruned")}
        print(json.dumps(_summary(summary["prune"]) | {"average": averages, "report": str(args.out)}))
        return
    print(_summary_text(summary["prune"]))
    print(summary["table"])
    print(f"report: {args.out / 'report.md'} and report.json; pruned model: {args.out / 'pruned'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from dietprune.sweep import sweep

    results = sweep(args.model, args.out, args.methods, args.sparsities, args.recover_modes,
                    _prune_settings(args), _profile_settings(args), tuple(args.heldout), args.limit,
                    _dtype(args.dtype), fresh=args.overwrite)
    if args.json:
        print(json.dumps({name: cell["average"] for name, cell in results["cells"].items()}))
        return
    print((args.out / "results.md").read_text())
    print(f"{len(results['cells'])} cells in {args.out}/cells; results.json, results.md, accuracy.png")


def cmd_bench(args: argparse.Namespace) -> None:
    from dietprune.bench import bench, table
    from dietprune.io import write_json_atomic

    result = bench(args.dense, args.pruned, args.repeats, args.dtype)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result["speedup"], indent=2) if args.json else table(result))


def cmd_inspect(args: argparse.Namespace) -> None:
    from dietprune.inspection import inspect_model, inspect_scores, plot_scores, render

    if args.path.is_dir():
        report = inspect_model(args.path)
    else:
        report = inspect_scores(args.path, args.k, args.aggregation)
        if args.plot:
            plot_scores(args.path, args.plot, args.aggregation)
    print(json.dumps(report, indent=2) if args.json else render(report))


def _add_prune_options(parser: argparse.ArgumentParser, per_cell: bool = False) -> None:
    """Pruning flags; a sweep sets sparsity, method, merge and recovery per cell instead."""
    from dietprune.api import RECOVERIES
    from dietprune.merge import MERGES
    from dietprune.methods import METHODS
    from dietprune.profile import AGGREGATIONS

    group = parser.add_argument_group("pruning")
    if not per_cell:
        group.add_argument("--sparsity", type=float, default=0.2, help="fraction of hidden dims to remove")
        group.add_argument("--method", choices=METHODS, default="diet", help="how dims are scored")
        group.add_argument("--merge", choices=MERGES, default="vote", help="how per-task scores combine")
        group.add_argument("--merge-tasks", nargs="+", default=[], metavar="TASK",
                           help="merge only these profiled tasks' scores (one task: its own mask)")
        group.add_argument("--recover", choices=RECOVERIES, default="none",
                           help="lsq: refit kept reader weights in closed form (no training)")
    group.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                       help="K is a multiple of N and of the head count (default auto: the largest "
                            "of 64..1 whose step is <= width/64)")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="l1")
    group.add_argument("--random-seed", type=int, default=0,
                       help="seed of --method random's ranking (--seed draws the calibration samples)")
    group.add_argument("--recover-samples", type=int, default=32, help="per task, from the calibration set")


def _add_eval_options(parser: argparse.ArgumentParser, limit: int | None) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--limit", type=int, default=limit, help="examples per task (after exclusions)")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    group.add_argument("--eval-batch-size", type=int, default=64, help="rows per forward pass (ours)")


def build_parser() -> argparse.ArgumentParser:
    from dietprune.api import RECOVERIES
    from dietprune.sweep import DEFAULT_VARIANTS, VARIANTS

    parser = argparse.ArgumentParser(prog="diet", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, run, out: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("--model", help="HF directory, .gguf file, hub id or embedded name "
                       "(default: the embedded gemma-3-270m)")
        p.add_argument("--out", type=Path, default=Path(out))
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.set_defaults(run=run)
        return p

    p = command("profile", "score hidden dimensions per task", cmd_profile, "scores.safetensors")
    _add_profile_options(p)

    p = command("prune", "profile, merge into one mask, slice, save a HF checkpoint", cmd_prune, "out/pruned")
    p.add_argument("--scores", type=Path, help="use this score file instead of profiling")
    _add_prune_options(p)
    _add_profile_options(p)

    p = commands.add_parser("eval", help="zero-shot accuracy on the tasks (never on calibration examples)")
    p.add_argument("model", nargs="?", help="as for `diet profile --model`")
    p.add_argument("--out", type=Path, help="write results JSON here (and a .md table beside it)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--backend", choices=("dietprune", "lm-eval"), default="dietprune")
    p.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                   help="also perplexity on 256 held-out LAMBADA passages (our backend only)")
    p.add_argument("--json", action="store_true", help="print the averages as JSON")
    _add_eval_options(p, limit=None)
    _add_profile_options(p)
    p.set_defaults(run=cmd_eval)

    p = command("run", "the main job: prune, evaluate dense and pruned, report", cmd_run, "out/run")
    p.add_argument("--heldout", nargs="*", default=["piqa"], help="tasks evaluated but never profiled")
    _add_prune_options(p, per_cell=True)
    _add_eval_options(p, limit=100)
    _add_profile_options(p)

    p = command("sweep", "methods x sparsities x recovery -> table and plot (resumable)", cmd_sweep,
                "out/sweep")
    p.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                   metavar="VARIANT", help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    p.add_argument("--recover-modes", nargs="+", choices=RECOVERIES, default=["none"])
    p.add_argument("--heldout", nargs="*", default=["piqa"], help="tasks evaluated but never profiled")
    _add_prune_options(p, per_cell=True)
    _add_eval_options(p, limit=100)
    _add_profile_options(p)

    p = commands.add_parser("bench", help="prefill/decode throughput and memory: dense vs pruned")
    p.add_argument("dense")
    p.add_argument("pruned")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("inspect", help="summarise a score file or a pruned model")
    p.add_argument("path", type=Path)
    p.add_argument("--k", type=int, help="top-K size for the overlap matrix (default: 80%% of dims)")
    p.add_argument("--aggregation", choices=("l1", "l2"), default="l1")
    p.add_argument("--plot", type=Path, help="write a PNG of the score distributions here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="diet: %(message)s")
    progress.SETTINGS["enabled"] = not args.quiet
    if not args.debug:  # our own progress bars and messages only
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    try:
        args.run(args)
    except DietError as exc:
        if args.debug:
            raise
        print(f"diet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diet: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
