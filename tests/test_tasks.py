"""Task formatting against lm-eval's definitions, metrics helpers, and calibration/evaluation splits."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from dietprune.errors import DietError
from dietprune.metrics import predictions, stderr
from dietprune.tasks import DEFAULT_TASKS, TASKS, Example, load_examples, split_ids

DOCS = {
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
    "rte": {"sentence1": "A cat sat.", "sentence2": "A dog sat.", "label": 1, "idx": 0},
    "hellaswag": {
        "activity_label": "Baking cookies",
        "ctx_a": "A woman [title] mixes flour.",
        "ctx_b": "she",
        "endings": ["adds  sugar [step] slowly.", "eats it.", " sings.", "leaves [header]"],
        "label": "2",
    },
    "winogrande": {
        "sentence": "The cup fell off the table because _ was wobbly.",
        "option1": "the cup",
        "option2": "the table",
        "answer": "2",
    },
    "arc_easy": {
        "question": "What is 2+2?",
        "choices": {"text": ["3", "4", "5"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    },
    "openbookqa": {
        "question_stem": "The sun is a",
        "choices": {"text": ["planet", "star", "moon", "comet"], "label": ["A", "B", "C", "D"]},
        "answerKey": " B",
    },
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
}

EXPECTED = {  # (contexts, continuations, gold), written out by hand from lm-eval's YAMLs
    "boolq": (
        ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:",) * 2,
        (" no", " yes"),
        1,
    ),
    "rte": (("A cat sat.\nQuestion: A dog sat. True or False?\nAnswer:",) * 2, (" True", " False"), 1),
    "hellaswag": (
        ("Baking cookies: A woman. mixes flour. She",) * 4,
        (" adds sugar slowly.", " eats it.", " sings.", " leaves "),  # strip happens before [..] removal
        2,
    ),
    "winogrande": (
        ("The cup fell off the table because the cup", "The cup fell off the table because the table"),
        (" was wobbly.", " was wobbly."),
        1,
    ),
    "arc_easy": (("Question: What is 2+2?\nAnswer:",) * 3, (" 3", " 4", " 5"), 1),
    "openbookqa": (("The sun is a",) * 4, (" planet", " star", " moon", " comet"), 1),
    "piqa": (("Question: Open a jar\nAnswer:",) * 2, (" Twist the lid.", " Eat the lid."), 0),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_formatting(task):
    ex = TASKS[task].example(DOCS[task], 7)
    contexts, continuations, gold = EXPECTED[task]
    assert (ex.task, ex.id) == (task, "7")
    assert ex.contexts == contexts
    assert ex.continuations == continuations
    assert ex.gold == gold
    assert ex.calibration_text() == contexts[gold] + continuations[gold]


def test_choices_are_lm_eval_doc_to_choice():
    assert TASKS["winogrande"].example(DOCS["winogrande"], 0).choices == EXPECTED["winogrande"][0]
    assert TASKS["arc_easy"].example(DOCS["arc_easy"], 0).choices == ("3", "4", "5")


def test_boolq_super_glue_schema_and_rte_labels():
    doc = {"question": "q", "passage": "p", "label": 0}
    assert TASKS["boolq"].example(doc, 0).gold == 0  # super_glue: label 0 = no
    assert TASKS["rte"].example(DOCS["rte"] | {"label": 0}, 0).continuations[0] == " True"  # 0 = entailment


def test_metrics_follow_lm_eval():
    assert {t: TASKS[t].metrics for t in ("boolq", "rte", "winogrande")} == {
        t: ("acc",) for t in ("boolq", "rte", "winogrande")
    }
    for t in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"):
        assert TASKS[t].metrics == ("acc", "acc_norm")
    assert set(DEFAULT_TASKS) <= set(TASKS)


def _example(choices, gold=0):
    return Example("t", "0", ("c",) * len(choices), tuple(" " + c for c in choices), gold, tuple(choices))


def test_acc_norm_divides_by_choice_characters():
    ex = _example(["a", "bbbb"])
    assert predictions(ex, [-2.0, -4.0]) == (0, 1)  # -2/1 < -4/4
    assert predictions(ex, [-2.0, -9.0]) == (0, 0)
    assert predictions(_example(["é", "ab"]), [-1.0, -2.0]) == (0, 0)  # characters, not bytes: tie -> first
    assert predictions(_example(["x", "y"]), [-1.0, -1.0]) == (0, 0)


def test_stderr_is_sample_stderr_of_mean():
    assert stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)
    assert stderr([1.0, 1.0]) == 0.0
    assert stderr([1.0]) is None
    values = [0.0, 1.0, 1.0]
    assert stderr(values) == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def _fake(n):
    return [_example(["x", "y"]) for _ in range(n)]


def test_split_ids():
    examples = [Example("t", str(i), ("c",), (" x",), 0, ("x",)) for i in range(50)]
    calib, rest = split_ids(examples, 10, seed=3)
    assert len(calib) == 10 and len(set(calib)) == 10 and len(rest) == 40
    assert not set(calib) & set(rest)
    assert set(calib) | set(rest) == {str(i) for i in range(50)}
    assert rest == sorted(rest, key=int)  # evaluation ids in file order
    assert split_ids(examples, 10, seed=3) == (calib, rest)
    assert split_ids(examples, 10, seed=4)[0] != calib
    assert split_ids(examples, 0, seed=3) == ([], [str(i) for i in range(50)])
    with pytest.raises(DietError, match="calibration"):
        split_ids(examples, 50, seed=0)
    with pytest.raises(DietError):
        split_ids(examples[:3], 5, seed=0)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DietError, match="unknown task 'no_such_task'.*arc_easy"):
        load_examples("no_such_task")
    with pytest.raises(DietError, match="source"):
        load_examples("rte", source="cloud")


SIZES = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
    "piqa": 1838,
}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_offline_data(task):
    examples = load_examples(task)
    assert len(examples) == SIZES[task]
    assert [ex.id for ex in examples[:3]] == ["0", "1", "2"]
    for ex in examples:
        assert 0 <= ex.gold < len(ex.contexts) == len(ex.continuations) == len(ex.choices)
        assert all(c.startswith(" ") for c in ex.continuations)


def test_matches_lm_eval_formatting():
    """Our prompts, continuations, choices and golds equal lm-eval's for the first 200 rows of every task."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from dietprune.lm_eval_bridge import write_task

    with tempfile.TemporaryDirectory() as tmp:
        for task in SIZES:
            examples = load_examples(task)[:200]
            name = write_task(task, examples, "offline", Path(tmp))
            lm_task = ConfigurableTask(config=load_yaml(Path(tmp) / f"{name}.yaml"))
            for ex, doc in zip(examples, lm_task.validation_docs(), strict=True):
                context = lm_task.fewshot_context(doc, 0)
                requests = lm_task.construct_requests(doc, context, metadata=(task, 0, 1))
                pairs = tuple(zip(ex.contexts, ex.continuations, strict=True))
                assert tuple(r.args for r in requests) == pairs
                target = lm_task.doc_to_text(doc) if task == "winogrande" else lm_task.doc_to_target(doc)
                assert target == ex.gold
                assert tuple(lm_task.doc_to_choice(doc)) == ex.choices
