"""The `diet` command end to end on a tiny model, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_PROFILE, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from dietprune.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cache")
FAST = FAST_PROFILE


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what the test's own set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diet: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_prune_writes_a_standard_checkpoint(tiny_dir, tmp_path, capsys, caplog):
    out = tmp_path / "pruned"
    with caplog.at_level("WARNING", logger="dietprune.api"):
        assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--sparsity", "0.25", *FAST]) == 0
    assert "hidden 48 -> 36" in capsys.readouterr().out  # auto rounding: a multiple of the 4 heads
    record = json.loads((out / "dietprune.json").read_text())
    assert record["hidden_size_after"] == 36 and len(record["kept_dims"]) == 36
    assert record["kept_width_step"] == 4 and record["settings"]["round_to"] is None
    width = record["width"]  # K 36 loses the multiple of 8 the dense 48 is: the record and a warning say so
    assert width["kept"] == 36 and width["multiple_of"] == 4 and not any(width["serving"].values())
    assert [r.getMessage() for r in caplog.records if r.name == "dietprune.api"] == [width["why"]]
    assert width["lost"] == ["vLLM RMSNorm vectorised"] and "the dense 48 is a multiple of 8" in width["why"]
    assert set(record["calibration"]) == {"arc_easy", "boolq", "rte", "lambada"}  # recovery's generic text
    counts = [len(record["calibration"][t]["ids"]) for t in ("arc_easy", "boolq", "rte", "lambada")]
    assert counts == [4, 4, 4, 12]
    assert AutoConfig.from_pretrained(out).hidden_size == 36
    assert AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.shape == (64, 36)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_profile_then_prune_from_scores_is_identical(tiny_dir, tmp_path):
    scores = tmp_path / "scores.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(scores), *FAST]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "a"), *FAST]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--scores", str(scores),
                 "--out", str(tmp_path / "b")]) == 0
    kept = [json.loads((tmp_path / n / "dietprune.json").read_text())["kept_dims"] for n in "ab"]
    assert kept[0] == kept[1]


@pytest.mark.parametrize("sparsity", ["0", "1", "-0.2", "1.5"])
def test_sparsity_outside_open_interval(tiny_dir, tmp_path, capsys, sparsity):
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"),
                             "--sparsity", sparsity])
    assert "strictly between 0 and 1" in err and not (tmp_path / "o").exists()


def test_missing_model(tmp_path, capsys):
    assert "model not found" in run_error(capsys, ["prune", "--model", str(tmp_path / "nope"),
                                                    "--out", str(tmp_path / "o")])


def test_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in run_error(capsys, ["prune", "--model", str(tmp_path / "empty"), "--out",
                                                   str(tmp_path / "o")])


def test_pickled_weights_are_refused(tmp_path, capsys):
    import torch

    model_dir = tmp_path / "bin"
    model = tiny_model("llama")
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")  # the pickled format
    err = run_error(capsys, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "o")])
    assert "has no .safetensors weights; dietprune never unpickles .bin files" in err


def test_unknown_architecture(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(tmp_path / "g")
    err = run_error(capsys, ["prune", "--model", str(tmp_path / "g"), "--out", str(tmp_path / "o")])
    assert "unsupported architecture 'gpt2'" in err and "llama" in err


def test_existing_output_is_left_alone(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    before = snapshot(out)
    assert "already exists" in run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(out)])
    assert snapshot(out) == before


def test_output_inside_the_input_model(tiny_dir, capsys):
    before = snapshot(tiny_dir)
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(tiny_dir / "pruned")])
    assert "overlaps the input" in err and snapshot(tiny_dir) == before


def test_width_the_heads_cannot_take(tiny_dir, tmp_path, capsys):
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"),
                             "--sparsity", "0.9", "--round-to", "16"])
    assert "the nearest possible sparsities are 0.6667 (K 16), more than 2.5 points away" in err
    assert not (tmp_path / "o").exists()


def test_alignment_a_nine_head_model_cannot_take(tmp_path, capsys):
    """SmolLM2's shape (576 wide, 9 heads): multiples of 256 and of 9 are multiples of 2304, wider than it."""
    model_dir = tmp_path / "nine"
    tiny_model("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1,
               intermediate_size=16).save_pretrained(model_dir)
    err = run_error(capsys, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--sparsity",
                             "0.2", "--round-to", "256"])
    assert "the nearest possible sparsities are none (no multiple is below 576); --round-to 32 allows 0.5 " \
           "(K 288); --round-to auto keeps K 459 (sparsity 0.2031)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-8", "eight"])
def test_bad_round_to(value, capsys):
    assert "positive integer or 'auto'" in run_error(capsys, ["prune", "--round-to", value])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_score_file(tiny_dir, tmp_path, capsys, content):
    scores = tmp_path / "bad.safetensors"
    scores.write_bytes(content)
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--scores", str(scores),
                             "--out", str(tmp_path / "o")])
    assert "score file" in err and not (tmp_path / "o").exists()


def test_truncated_score_file(tiny_dir, tmp_path, capsys):
    scores = tmp_path / "scores.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(scores), *FAST]) == 0
    scores.write_bytes(scores.read_bytes()[:-40])
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--scores", str(scores),
                             "--out", str(tmp_path / "o")])
    assert "score file" in err


def test_unknown_task(tiny_dir, tmp_path, capsys):
    err = run_error(capsys, ["profile", "--model", str(tiny_dir), "--out", str(tmp_path / "s"),
                             "--tasks", "squad"])
    assert "squad" in err and "boolq" in err


def test_subprocess_exit_code_and_single_line(tmp_path):
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "dietprune.cli", "prune", "--model", str(tmp_path / "x"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("diet: error: model not found")


def test_rerun_is_byte_identical(tiny_dir, tmp_path, monkeypatch):
    for name in ("a", "b"):
        monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / f"cache-{name}"))  # no shared cache
        assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / name), *FAST]) == 0
    a, b = (json.loads((tmp_path / n / "dietprune.json").read_text()) for n in "ab")
    assert a["kept_dims"] == b["kept_dims"] and a["calibration"] == b["calibration"]
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]


def test_interrupted_profile_writes_nothing_and_the_cache_serves_tasks_seen(tiny_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """Every task is profiled in one pass over the blocks; Ctrl-C during it leaves no output. A finished
    pass caches each task's statistics: a later run profiles only the tasks it has not seen."""
    import dietprune.pipeline

    calls = []
    real_profile = dietprune.pipeline.profile

    def counted(weights, tokenizer, corpora, *args, **kwargs):
        calls.append([c.name for c in corpora])
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first pass
        return real_profile(weights, tokenizer, corpora, *args, **kwargs)

    monkeypatch.setattr(dietprune.pipeline, "profile", counted)
    out = tmp_path / "scores.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(out), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err and not out.exists()
    assert main(["profile", "--model", str(tiny_dir), "--out", str(out), *FAST]) == 0
    assert main(["profile", "--model", str(tiny_dir), "--out", str(tmp_path / "more.safetensors"), *FAST,
                 "--tasks", "arc_easy", "boolq", "rte", "piqa"]) == 0
    assert calls == [["arc_easy", "boolq", "rte"], ["arc_easy", "boolq", "rte"], ["piqa"]]


def test_inspect_scores_and_model(tiny_dir, tmp_path, capsys):
    scores = tmp_path / "scores.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(scores), "--json", *FAST]) == 0
    assert set(json.loads(capsys.readouterr().out)["tokens"]) == {"arc_easy", "boolq", "rte"}
    assert main(["inspect", str(scores), "--k", "32", "--json", "--plot", str(tmp_path / "s.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["k"] == 32 and report["overlap"]["rte"]["rte"] == 32
    assert 0 < report["overlap"]["rte"]["boolq"] <= 32
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
    assert "not a model pruned by dietprune" in run_error(capsys, ["inspect", str(tiny_dir)])


def test_output_under_a_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "file" / "out")])
    assert "is a file, not a directory" in err


def test_output_not_writable(tiny_dir, tmp_path, capsys):
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", "/proc/self/out"])
    assert err.startswith("diet: error: cannot write to /proc/") and err.endswith("is not writable")


def test_too_few_examples_for_the_calibration_size(tiny_dir, tmp_path, capsys):
    err = run_error(capsys, ["profile", "--model", str(tiny_dir), "--out", str(tmp_path / "s"),
                             "--tasks", "rte", "--samples", "300"])
    assert "300 calibration examples from 277 rte examples" in err


def test_corrupt_gguf(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file at all" * 10)
    err = run_error(capsys, ["prune", "--model", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "o")])
    assert "cannot read GGUF" in err and "magic" in err and not (tmp_path / "o").exists()


def test_tokenizer_without_pad_token(tmp_path):
    model_dir = tmp_path / "nopad"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert main(["prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), *FAST]) == 0


def test_quiet_prints_no_progress_bars(tiny_dir, tmp_path):
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "dietprune.cli", "--quiet", "prune", "--model", str(tiny_dir),
                          "--out", str(tmp_path / "o"), "--json", *FAST], capture_output=True, text=True,
                         env=env)
    assert json.loads((tmp_path / "o" / "dietprune.json").read_text())["width"]["lost"] == []
    assert run.returncode == 0 and run.stderr == ""  # K 40 of 48 loses no alignment: no warning, no bars
    assert json.loads(run.stdout)["hidden_size_after"] == 40


def test_unsupported_gguf_quantisation(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "q8k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    kind = gguf.GGMLQuantizationType.Q8_K  # a type gguf can quantise into but not dequantize
    writer.add_tensor("blk.0.attn_q.weight", np.zeros(gguf.GGML_QUANT_SIZES[kind][1], dtype=np.uint8),
                      raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = run_error(capsys, ["prune", "--model", str(path), "--out", str(tmp_path / "o")])
    assert "tensor blk.0.attn_q.weight is quantised as Q8_K, which cannot be dequantized" in err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_while_saving_keeps_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import dietprune.api

    def interrupted(weights, directory, dtype):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dietprune.api, "save_model", interrupted)
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # neither the output nor a temporary


KILLED_WHILE_SAVING = """
import os, signal, sys
import dietprune.api as api
from dietprune.cli import main

def killed(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind runs

original, api.save_model = api.save_model, killed
sys.exit(main(sys.argv[1:]))
"""


def test_killed_while_saving_leaves_no_output_and_the_next_run_cleans_up(tiny_dir, tmp_path):
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "cache")}
    argv = ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST]
    run = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, *argv], capture_output=True, env=env)
    assert run.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert not (tmp_path / "o").exists() and len(leftovers) == 1
    assert (leftovers[0] / "model.safetensors").is_file()  # the killed run's half-finished work
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "o"]


def test_an_output_set_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    from dietprune.io import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    set_aside = tmp_path / f".o.{dead}.old"  # killed between moving the old output away and renaming
    set_aside.mkdir()
    (set_aside / "mine").write_text("user data")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "o"):
        raise RuntimeError("the new run fails too")
    assert (tmp_path / "o" / "mine").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("disable", [True, False])
def test_progress_bar_switches(monkeypatch, enabled, disable):
    from dietprune import progress

    monkeypatch.setitem(progress.SETTINGS, "enabled", enabled)
    bar = progress.progress(range(3), disable=disable)
    assert bar.disable == (disable or not enabled) and list(bar) == [0, 1, 2]


def test_eval_loads_the_model_in_the_asked_dtype(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", str(tiny_dir), "--tasks", "rte", "--limit", "3", "--out", str(out)]
    assert main([*argv, "--dtype", "bfloat16", "--no-perplexity"]) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["dtype"] == "bfloat16" and results["tasks"]["rte"]["n"] == 3
    assert "perplexity" not in results
    assert main([*argv, "--overwrite"]) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["dtype"] == "float32" and results["perplexity"]["texts"] == 256


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: what it checks must be refused before one."""
    import dietprune.api

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dietprune.api, "load_model", loaded)


BEFORE_LOADING = {  # diet run's arguments after FAST -> its one line, before any model is loaded
    "missing calibration file": (["--calibration", "{tmp}/missing.jsonl"],
                                 "calibration file not found: {tmp}/missing.jsonl"),
    "calibration folder": (["--calibration", "{tmp}"], "calibration file {tmp} is a folder"),
    "malformed calibration row": (["--calibration", "{tmp}/t.jsonl"],
                                  "calibration file {tmp}/t.jsonl: line 3 is not valid JSON (Expecting ',' "
                                  "delimiter, column 14)"),
    "missing include path": (["--include-path", "{tmp}/nope"], "--include-path {tmp}/nope: no such folder"),
    "include path that is a file": (["--include-path", "{tmp}/c.txt"], "--include-path {tmp}/c.txt: a file"),
    "task YAML that is not YAML": (["--include-path", "{tmp}/tasks", "--tasks", "quiz"],
                                   "task YAML {tmp}/tasks/quiz.yaml is not valid YAML: expected ',' or ']', "
                                   "but got '<stream end>' (line 3, column 1)"),
    "merge of a task not profiled": (["--merge-tasks", "piqa"],
                                     "cannot merge piqa: not among the profiled arc_easy, boolq, rte"),
    "merge with a method that scores no task": (["--method", "magnitude", "--merge-tasks", "rte"],
                                                "--merge-tasks does not apply to --method magnitude"),
    "recovery after a structural method": (["--method", "shortgpt", "--recover", "full"],
                                           "shortgpt chooses its own structure"),
    "streaming with a device map": (["--weights", "stream", "--device-map", "auto"],
                                    "--weights stream reads one block at a time onto one device"),
    "too few examples": (["--tasks", "rte", "--samples", "300"], "300 calibration examples from 277 rte"),
    "too little generic text": (["--method", "agnostic", "--tasks", "boolq", "hellaswag", "--samples",
                                 "3000"],
                                "the generic corpus has 4897 calibration passages, not 6000"),
    "nothing to evaluate": (["--tasks", "--calibration", "{tmp}/c.txt", "--heldout"], "nothing to evaluate"),
}


@pytest.mark.parametrize("case", BEFORE_LOADING)
def test_bad_input_is_refused_before_any_model_loads(case, tiny_dir, tmp_path, capsys, no_loading):
    (tmp_path / "c.txt").write_text("the a is\nof yes no\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quiz.yaml").write_text("task: quiz\ndoc_to_text: [unclosed\n")
    words, message = BEFORE_LOADING[case]
    out = tmp_path / "run"
    err = run_error(capsys, ["run", "--model", str(tiny_dir), "--out", str(out), *FAST,
                             *(w.format(tmp=tmp_path) for w in words)])
    assert message.format(tmp=tmp_path) in err and not out.exists()


def test_an_unknown_held_out_task_is_refused_before_any_work(tiny_dir, tmp_path, capsys, no_loading):
    """diet run evaluated every other task (and computed perplexity) before it found this one."""
    err = run_error(capsys, ["run", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST,
                             "--heldout", "piqa", "no_such_task"])
    assert "unknown task 'no_such_task'" in err and not (tmp_path / "o").exists()


def test_an_unwritable_cache_is_refused_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch, no_loading):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "file" / "cache"))
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST])
    assert f"the dietprune cache {tmp_path / 'file' / 'cache'} cannot be written ({tmp_path / 'file'} is a " \
           "file); set DIETPRUNE_CACHE" in err


def test_scores_naming_a_directory(tiny_dir, tmp_path, capsys, no_loading):
    err = run_error(capsys, ["prune", "--model", str(tiny_dir), "--scores", str(tmp_path),
                             "--out", str(tmp_path / "o")])
    assert f"{tmp_path} is a directory, not a score file" in err


@pytest.mark.parametrize(("change", "message"), [
    ({"intermediate_size": 96}, "its weights do not match its config.json: "
                                "model.layers.0.mlp.down_proj.weight is 48x80 in the weights, 48x96 by the "
                                "config (and 8 more tensors); give the config.json saved with these weights"),
    ({"num_hidden_layers": 4}, "its weights lack model.layers.3.input_layernorm.weight and 8 more, which its "
                               "config.json makes"),
])
def test_a_config_that_disagrees_with_the_weights(change, message, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | change))
    err = run_error(capsys, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), *FAST])
    assert f"cannot load model {model_dir}: {message}" in err


def test_a_model_without_tokenizer_files(tiny_dir, tmp_path, capsys):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    err = run_error(capsys, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), *FAST])
    assert f"{model_dir} has no tokenizer files (looked for tokenizer.json, tokenizer.model, " in err
    assert "copy those of the model it was made from into it" in err


def test_a_damaged_score_cache_entry_is_rebuilt_with_one_warning(tiny_dir, tmp_path, caplog):
    argv = ["profile", "--model", str(tiny_dir), *FAST]
    assert main([*argv, "--out", str(tmp_path / "a.safetensors")]) == 0
    entries = sorted((tmp_path / "cache" / "scores").glob("*.safetensors"))
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:-40])  # truncated
    caplog.clear()
    assert main([*argv, "--out", str(tmp_path / "b.safetensors")]) == 0
    [warning] = [r.getMessage() for r in caplog.records if r.name == "dietprune.scores"]
    assert warning.startswith(f"rebuilding a damaged cache entry {entries[0].name}")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("record", ["with sizes", "without sizes"])
def test_a_damaged_converted_model_is_converted_again(record, tiny_dir, tmp_path, monkeypatch, caplog):
    """A converted GGUF whose weights were truncated is converted again, with one warning line. (GGUF
    reading is replaced by the tiny model: the conversion itself, its record and its check are real.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dietprune.models import load

    conversions = []

    class Model:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kwargs):
            if gguf_file:
                conversions.append(gguf_file)
                return tiny_model("gemma3_text")
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    class Tokenizer:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kwargs):
            return tiny_tokenizer() if gguf_file else AutoTokenizer.from_pretrained(path, **kwargs)

    monkeypatch.setattr(load, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(load, "AutoTokenizer", Tokenizer)
    monkeypatch.setattr(load, "_check_gguf_types", lambda gguf: "float32")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stands for a GGUF file")
    converted = Path(load.resolve(str(gguf)).path)
    assert load.resolve(str(gguf)).path == str(converted) and conversions == ["m.gguf"]  # cached
    source = json.loads((converted / load.SOURCE_RECORD).read_text())
    assert source["sizes"]["model.safetensors"] == (converted / "model.safetensors").stat().st_size
    if record == "without sizes":  # written by an earlier dietprune: the weights' headers give the sizes
        del source["sizes"]
        (converted / load.SOURCE_RECORD).write_text(json.dumps(source))
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    caplog.clear()
    assert load.load_model(str(gguf)).model.config.hidden_size == 48
    assert conversions == ["m.gguf", "m.gguf"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == load.__name__]
    assert "the cached conversion is damaged (model.safetensors has" in warning and "is rebuilt" in warning
