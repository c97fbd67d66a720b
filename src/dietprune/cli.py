"""The `diet` command: a thin front over dietprune.api, its options generated from dietprune.settings.

Each subcommand declares the settings groups it takes; every field of those groups becomes a flag with
the field's help, default and allowed values. Values come from the defaults, then `--config FILE`, then
the flags given. Any bad value, here or in the file, is one `diet: error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from transformers.utils import logging as transformers_logging

from dietprune import progress
from dietprune.device import init_distributed, memory_guard
from dietprune.errors import DietError
from dietprune.methods import REGISTRIES, check_name
from dietprune.settings import (
    BenchSettings,
    CalibrationSettings,
    EvalSettings,
    InspectSettings,
    PruneSettings,
    RuntimeSettings,
    Settings,
    SweepSettings,
    build,
    domain,
    element_type,
    flag,
    read_config,
)


class UsageError(DietError):
    """A command line argparse cannot parse."""


class Parser(argparse.ArgumentParser):
    """argparse with our error discipline: one line, exit code 2, through `main`."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    """A subcommand: the settings groups it takes (all their fields but `skip`, or only `only`), its
    model argument ("option", "positional" or none) and its default output (None: --out is optional)."""

    help: str
    run: Callable
    groups: tuple[type[Settings], ...]
    out: str | None = None
    model: str | None = "option"
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None

    def options(self) -> dict[str, type[Settings]]:
        """Option name -> its group, for every option this command takes."""
        return {f.name: group for group in self.groups for f in fields(group)
                if f.name not in self.skip and (self.only is None or f.name in self.only)}


def _settings(command: Command, args: argparse.Namespace) -> dict[type[Settings], Settings]:
    """Each group's settings: defaults, then the --config file, then the flags given; names that
    belong to a registry are checked here too, before anything runs."""
    options = command.options()
    values = read_config(args.config) if args.config else {}
    if command.model and "model" in values:  # the model a config names, unless one is given
        configured = values.pop("model")
        if not isinstance(configured, str):
            raise DietError(f"config {args.config}: model must be a model directory, .gguf file, hub id or "
                            f"embedded name, got {configured!r}")
        args.model = args.model or configured
    for name in values:
        if name not in options:
            raise DietError(f"config {args.config}: option {name!r} does not apply to diet {args.command}; "
                            f"it takes {', '.join(options)}")
    values |= {name: getattr(args, name) for name in options if hasattr(args, name)}
    settings = {group: build(group, {n: v for n, v in values.items() if options[n] is group})
                for group in command.groups}
    for group, instance in settings.items():
        for f in fields(group):
            if f.metadata["registry"] and f.name in options:
                value = getattr(instance, f.name)
                for name in value if isinstance(value, tuple) else (value,):
                    check_name(f.metadata["registry"], name, flag(f.name))
    return settings


DATA_PARALLEL = ("profile", "prune")  # the commands torchrun may run: profiling and recovery are sharded


def _join_process_group(command: str, runtime: RuntimeSettings | None) -> None:
    """Under torchrun, join the process group (profile and prune), or refuse a command that does not
    run data parallel before it starts (each process would repeat it and race on its output)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    if command not in DATA_PARALLEL:
        raise DietError(f"diet {command} does not run data parallel; run it without torchrun")
    from dietprune.plan import resolve_device

    init_distributed(resolve_device(runtime.device), runtime.device_map)


def cmd_profile(args, settings) -> None:
    from dietprune.api import profile
    from dietprune.calibration import is_main_process
    from dietprune.io import check_output_path
    from dietprune.scores import save_scores

    check_output_path(args.out, args.overwrite)
    stats, meta = profile(args.model, calibration_settings=settings[CalibrationSettings],
                          runtime=settings[RuntimeSettings])
    if not is_main_process():
        return
    save_scores(args.out, stats, meta, "replace" if args.overwrite else "refuse")
    tokens = {task: s.tokens for task, s in stats.items()}
    print(json.dumps({"out": str(args.out), "tokens": tokens}) if args.json else
          f"wrote {args.out}: {len(stats)} tasks, {sum(tokens.values())} tokens")


def cmd_prune(args, settings) -> None:
    from dietprune.api import prune, save
    from dietprune.calibration import is_main_process
    from dietprune.io import check_output_path
    from dietprune.report import prune_summary, prune_summary_text

    local = Path(args.model).expanduser() if args.model else None
    protected = (local,) if local and local.exists() else ()
    check_output_path(args.out, args.overwrite, protected)
    staging = args.out.parent / f".{args.out.name}.{os.getpid()}.blocks.tmp"  # a streamed prune writes here
    try:
        pruned = prune(args.model, settings=settings[PruneSettings],
                       calibration_settings=settings[CalibrationSettings], runtime=settings[RuntimeSettings],
                       scores=args.scores, in_place=True, staging=staging)
        if not is_main_process():  # data parallel: every process computed the same model; the first kept it
            return
        save(pruned, args.out, args.overwrite, protected)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = pruned.record
    print(json.dumps(prune_summary(record), indent=2) if args.json else prune_summary_text(record))


def cmd_eval(args, settings) -> None:
    from dietprune.api import evaluate
    from dietprune.io import check_output_path, write_atomic, write_json_atomic
    from dietprune.report import markdown_table

    if args.out:
        for path in (args.out, args.out.with_suffix(".md")):
            check_output_path(path, args.overwrite)
    results = evaluate(args.model, settings=settings[EvalSettings],
                       calibration_settings=settings[CalibrationSettings],
                       runtime=settings[RuntimeSettings])
    table = markdown_table(results)
    if args.out:
        if_exists = "replace" if args.overwrite else "refuse"
        write_json_atomic(args.out, results, if_exists)
        write_atomic(args.out.with_suffix(".md"), table + "\n", if_exists)
    print(json.dumps(results["average"]) if args.json else table)


def cmd_run(args, settings) -> None:
    from dietprune.api import run
    from dietprune.report import prune_summary

    summary = run(args.model, args.out, settings[PruneSettings], settings[CalibrationSettings],
                  settings[EvalSettings], settings[RuntimeSettings], args.overwrite)
    if args.json:
        averages = {name: summary[name]["average"] for name in ("dense", "pruned")}
        print(json.dumps(prune_summary(summary["prune"]) | {"average": averages, "report": str(args.out)}))
        return
    print(summary["table"])
    print(f"report: {args.out / 'report.md'} and report.json; pruned model: {args.out / 'pruned'}")


def cmd_sweep(args, settings) -> None:
    from dietprune.sweep import sweep

    results = sweep(args.model, args.out, settings[SweepSettings], settings[PruneSettings],
                    settings[CalibrationSettings], settings[EvalSettings], settings[RuntimeSettings],
                    fresh=args.overwrite)
    if args.json:
        print(json.dumps({name: cell["average"] for name, cell in results["cells"].items()
                          if "average" in cell}))
        return
    print((args.out / "results.md").read_text())
    print(f"{len(results['cells'])} cells in {args.out}/cells; results.json, results.md, accuracy.png")


def cmd_bench(args, settings) -> None:
    from dietprune.bench import bench, table
    from dietprune.io import check_output_path, write_json_atomic
    from dietprune.models.load import resolve

    if args.out:
        check_output_path(args.out, args.overwrite)
    for model in (args.dense, args.pruned):  # both found before either is measured
        resolve(model)
    runtime = settings[RuntimeSettings]
    result = bench(args.dense, args.pruned, settings[BenchSettings].repeats, runtime.dtype, runtime.device)
    if args.out:
        write_json_atomic(args.out, result, "replace" if args.overwrite else "refuse")
    print(json.dumps(result["speedup"], indent=2) if args.json else table(result))


def cmd_inspect(args, settings) -> None:
    from dietprune.inspection import inspect_model, inspect_scores, plot_scores, render

    aggregation = settings[PruneSettings].aggregation
    if args.path.is_dir():
        report = inspect_model(args.path)
    else:
        report = inspect_scores(args.path, settings[InspectSettings].k, aggregation)
        if args.plot:
            plot_scores(args.path, args.plot, aggregation)
    print(json.dumps(report, indent=2) if args.json else render(report))


PER_CELL = tuple(f.metadata["per_cell"] for f in fields(SweepSettings))
CALIBRATE = (CalibrationSettings, RuntimeSettings)
COMMANDS: dict[str, Command] = {
    "profile": Command("score hidden dimensions per task", cmd_profile, CALIBRATE, out="scores.safetensors"),
    "prune": Command("profile, merge into one mask, slice, save a HF checkpoint", cmd_prune,
                     (PruneSettings, *CALIBRATE), out="out/pruned"),
    "eval": Command("zero-shot accuracy on the tasks and the held-out ones (never on calibration examples)",
                    cmd_eval, (EvalSettings, *CALIBRATE), model="positional"),
    "run": Command("the main job: prune, evaluate dense and pruned, report", cmd_run,
                   (PruneSettings, EvalSettings, *CALIBRATE), out="out/run"),
    "sweep": Command("methods x sparsities x recovery -> table and plot (resumable)", cmd_sweep,
                     (SweepSettings, PruneSettings, EvalSettings, *CALIBRATE), out="out/sweep",
                     skip=PER_CELL),
    "bench": Command("prefill/decode throughput and memory: dense vs pruned", cmd_bench,
                     (BenchSettings, RuntimeSettings), model=None),
    "inspect": Command("summarise a score file or a pruned model", cmd_inspect,
                       (InspectSettings, PruneSettings), model=None, only=("k", "aggregation")),
}


def parse_value(f, hint, value: str):
    """One command-line word as a value of field `f` (an element, for a tuple field)."""
    if value == f.metadata["none"]:
        return None
    element = element_type(hint)
    try:
        return element(value) if element in (int, float) else value
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {domain(f, element)}, got {value!r}") from None


def _add_option(group: argparse._ArgumentGroup, settings_class: type[Settings], f) -> None:
    hint = typing.get_type_hints(settings_class)[f.name]
    meta = f.metadata
    choices = list(REGISTRIES[meta["registry"]]) if meta["registry"] else meta["choices"]
    default = f.default
    shown = meta["none"] if default is None and meta["none"] else default
    if isinstance(shown, tuple):
        shown = " ".join(map(str, shown)) or "none"
    text = meta["help"] + (f"; one of {', '.join(choices)}" if choices else "") + f" (default: {shown})"
    kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"),
                  metavar=meta["metavar"])
    if hint is bool:
        group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(hint) is tuple:
        kwargs["nargs"] = "*" if meta["empty"] else "+"
    kwargs["type"] = lambda value, f=f, hint=hint: parse_value(f, hint, value)
    if kwargs["metavar"] is None:
        kwargs["metavar"] = f.name.upper()
    group.add_argument(flag(f.name), **kwargs)


def build_parser() -> Parser:
    parser = Parser(prog="diet", description="Make a language model smaller without training (DIET).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, command in COMMANDS.items():
        p = commands.add_parser(name, help=command.help, description=command.help)
        if command.model == "option":
            p.add_argument("--model", help="HF directory, .gguf file, hub id or embedded name "
                           "(default: the embedded gemma-3-270m)")
        elif command.model == "positional":
            p.add_argument("model", nargs="?", help="as for `diet prune --model`")
        if name == "bench":
            p.add_argument("dense", help="the dense model (as for --model)")
            p.add_argument("pruned", help="the pruned model directory")
        if name == "inspect":
            p.add_argument("path", type=Path, help="a score file or a pruned model directory")
            p.add_argument("--plot", type=Path, help="write a PNG of the score distributions here")
        else:
            p.add_argument("--out", type=Path, default=Path(command.out) if command.out else None,
                           help="output path" + (f" (default: {command.out})" if command.out else
                                                 " for the results JSON (and a .md table beside it)"))
            p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if name == "prune":
            p.add_argument("--scores", type=Path, help="use this score file instead of profiling")
        p.add_argument("--config", type=Path, help="option values from a YAML or JSON file (or a pruned "
                       "model's dietprune.json), and the model; flags given override it")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        options = command.options()
        for settings_class in command.groups:
            group = p.add_argument_group(settings_class.title)
            for f in fields(settings_class):
                if f.name in options:
                    _add_option(group, settings_class, f)
        p.set_defaults(command_spec=command)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send), raised where the program is, so clean-up runs as for Ctrl-C."""


def _terminate(signum: int, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="diet: %(message)s")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        progress.SETTINGS["enabled"] = not args.quiet
        if not args.debug:  # our own progress bars and messages only
            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
        command = args.command_spec
        settings = _settings(command, args)
        _join_process_group(args.command, settings.get(RuntimeSettings))
        from dietprune.calibration import is_main_process

        if not is_main_process():  # under torchrun the first process speaks for all (errors aside)
            progress.SETTINGS["enabled"] = False
            logging.getLogger().setLevel(logging.ERROR)
        with memory_guard(getattr(settings.get(RuntimeSettings), "device", "cpu")):
            command.run(args, settings)
    except DietError as exc:
        if debug:
            raise
        print(f"diet: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("diet: terminated; no partial output was kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("diet: interrupted; no partial output was kept", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
