"""Every option is defined once and checked at the boundary: out-of-range values of every subcommand's
options are refused with one line and exit 2 before anything is written; config files; the API."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import fields

import pytest
import torch
from conftest import FAST_PROFILE, tiny_model, tiny_tokenizer

import dietprune
from dietprune.cli import COMMANDS, main
from dietprune.errors import DietError
from dietprune.settings import GROUPS, PruneSettings, element_type

pytestmark = pytest.mark.usefixtures("isolated_cache")


def bad_values(f, hint) -> list[list[str]]:
    """Command-line words out of a field's domain (free-form strings excepted)."""
    meta, element = f.metadata, element_type(hint)
    if hint is bool:
        return []
    values: list[list[str]] = []
    if typing.get_origin(hint) is tuple and not meta["empty"]:
        values.append([])
    if meta["choices"] is not None or meta["registry"]:
        values.append(["bogus"])
    if element in (int, float):
        values.append(["x"])
        low, high = meta["minimum"], meta["maximum"]
        if meta["exclusive"]:
            values += [[str(low)], [str(high)]]
        elif low is not None:
            values.append([str(low - 1)])
        if high is not None and not meta["exclusive"]:
            values.append([str(high + 1)])
        if element is float:
            values += [["nan"], ["inf"]]
    return values


CASES = [(name, f.name, words) for name, command in COMMANDS.items()
         for f in (f for group in command.groups for f in fields(group) if f.name in command.options())
         for words in bad_values(f, typing.get_type_hints(command.options()[f.name])[f.name])]


def snapshot(path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def command_line(command: str, model, tmp_path) -> list[str]:
    """`diet COMMAND` with its model arguments and an output under `tmp_path`."""
    argv = [command]
    if command == "eval":
        argv.append(str(model))
    elif command == "bench":
        argv += [str(model), str(model)]
    elif command == "inspect":
        argv.append(str(tmp_path / "scores.safetensors"))
    else:
        argv += ["--model", str(model)]
    if command != "inspect":
        argv += ["--out", str(tmp_path / "out")]
    return argv


def refused(argv: list[str], tmp_path, capsys) -> str:
    """The one error line of `diet argv`, exit code 2, nothing written under `tmp_path`."""
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diet: error: ") and "\n" not in err and "Traceback" not in err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize(("command", "option", "words"), CASES, ids=[f"{c}-{o}-{'_'.join(w) or 'none'}"
                                                                     for c, o, w in CASES])
def test_every_option_refuses_values_out_of_its_domain(command, option, words, tiny_dir, tmp_path, capsys):
    err = refused([*command_line(command, tiny_dir, tmp_path), "--" + option.replace("_", "-"), *words],
                  tmp_path, capsys)
    assert option.replace("_", "-") in err or "unknown value" in err


def config_bad_values(f, hint) -> list:
    """Config-file values of a field's type that the command line cannot spell: another type (a string
    for a number, a number for a string, a fraction for an integer), a list where one value belongs, null
    where a value is needed. (Ranges and choices are the same check as on the command line, walked above.)"""
    element, many = element_type(hint), typing.get_origin(hint) is tuple
    other = "x" if element in (int, float, bool) else 5
    values = [[other] if many else other]
    if element is int:
        values.append(1.5)
    if many or type(None) not in typing.get_args(hint):
        values.append(None)
    if not many:
        values.append([f.default, f.default])
    return values


CONFIG_CASES = [(name, f.name, value) for name, command in COMMANDS.items()
                for f in (f for group in command.groups for f in fields(group) if f.name in command.options())
                for value in config_bad_values(f, typing.get_type_hints(command.options()[f.name])[f.name])]


@pytest.mark.parametrize(("command", "option", "value"), CONFIG_CASES,
                         ids=[f"{c}-{o}-{json.dumps(v)}" for c, o, v in CONFIG_CASES])
def test_every_option_from_a_config_file_is_checked_as_on_the_command_line(command, option, value, tiny_dir,
                                                                          tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({option: value}))
    err = refused([*command_line(command, tiny_dir, tmp_path), "--config", str(config)], tmp_path, capsys)
    assert "--" + option.replace("_", "-") in err


def test_a_list_where_one_value_belongs_names_the_sweep_option(tiny_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("sparsity: [0.2, 0.3]\n")
    err = refused(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--config",
                   str(tmp_path / "c.yaml")], tmp_path, capsys)
    assert err == "diet: error: --sparsity takes one value, not a list: got [0.2, 0.3] (diet sweep " \
                  "--sparsities takes several)"


def test_one_value_for_a_list_option_is_a_list_of_one():
    from dietprune.settings import CalibrationSettings

    assert CalibrationSettings(tasks="rte", calibration="a.txt").tasks == ("rte",)
    assert CalibrationSettings(tasks=["rte", "boolq"]).tasks == ("rte", "boolq")


def test_the_walk_covers_the_count_and_limit_options():
    covered = {option for _, option, _ in CASES}
    assert {"samples", "seed", "batch_size", "max_length", "limit", "eval_batch_size", "recover_samples",
            "recover_alpha", "random_seed", "repeats", "k", "round_to", "sparsity", "sparsities"} <= covered


def test_option_names_are_unique_across_groups():
    names = [f.name for group in GROUPS for f in fields(group)]
    assert len(names) == len(set(names))


def test_sparsity_message_and_api_validation():
    with pytest.raises(DietError, match=r"--sparsity must be a number strictly between 0 and 1, got 1.5"):
        PruneSettings(sparsity=1.5)
    with pytest.raises(DietError, match="--recover-samples must be a positive integer, got 0"):
        dietprune.prune(tiny_model("llama"), tiny_tokenizer(), recover_samples=0)
    with pytest.raises(DietError, match="unknown option 'sparsty'"):
        dietprune.prune(tiny_model("llama"), tiny_tokenizer(), sparsty=0.3)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_gives_the_same_model_as_flags(tiny_dir, tmp_path, suffix):
    flags = ["--sparsity", "0.25", "--merge", "mean", "--round-to", "auto", *FAST_PROFILE]
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "flags"), *flags]) == 0
    config = tmp_path / f"c{suffix}"
    values = {"sparsity": 0.25, "merge": "mean", "round_to": "auto", "samples": 4,
              "tasks": ["arc_easy", "boolq", "rte"]}
    if suffix == ".json":
        config.write_text(json.dumps(values))
    else:
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    argv = ["prune", "--model", str(tiny_dir), "--config", str(config)]
    assert main([*argv, "--out", str(tmp_path / "cfg")]) == 0
    records = [json.loads((tmp_path / n / "dietprune.json").read_text()) for n in ("flags", "cfg")]
    assert records[0]["kept_dims"] == records[1]["kept_dims"]
    assert records[0]["settings"] == records[1]["settings"]
    # a flag given on the command line overrides the file
    assert main([*argv, "--out", str(tmp_path / "over"), "--sparsity", "0.5"]) == 0
    assert json.loads((tmp_path / "over" / "dietprune.json").read_text())["hidden_size_after"] == 24


def test_a_pruned_models_record_rebuilds_it(tiny_dir, tmp_path):
    """dietprune.json holds the settings in config form: --config with it gives the same checkpoint."""
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "a"), "--sparsity", "0.3",
                 "--aggregation", "l2", *FAST_PROFILE]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "b"),
                 "--config", str(tmp_path / "a" / "dietprune.json")]) == 0
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]


def test_config_errors_are_one_line(tiny_dir, tmp_path, capsys):
    cases = {"unknown.yaml": ("sparsty: 0.3\n", "option 'sparsty' does not apply to diet prune"),
             "other.yaml": ("limit: 3\n", "option 'limit' does not apply to diet prune"),
             "range.yaml": ("samples: 0\n", "--samples must be a positive integer, got 0"),
             "kind.yaml": ("samples: many\n", "--samples must be a positive integer, got 'many'"),
             "broken.yaml": ("sparsity: [0.3\n", "is not valid YAML: expected ',' or ']', but got "
                             "'<stream end>' (line 2, column 1)"),
             "model.yaml": ("model: [a, b]\n", "model must be a model directory, .gguf file, hub id or "
                            "embedded name, got ['a', 'b']"),
             "broken.json": ("{\"sparsity\": ", "is not valid JSON"),
             "list.yaml": ("- 1\n- 2\n", "must hold a mapping")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        capsys.readouterr()
        assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"),
                     "--config", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (name, err)
    assert not (tmp_path / "o").exists()


def test_run_takes_every_prune_option(tiny_dir, tmp_path, capsys):
    """The README's main command with every prune option, end to end on a tiny model."""
    out = tmp_path / "run"
    argv = ["--quiet", "run", "--model", str(tiny_dir), "--out", str(out), "--sparsity", "0.25",
            "--limit", "3", "--method", "diet", "--merge", "weighted", "--merge-tasks", "rte", "boolq",
            "--aggregation", "l2", "--recover", "lsq", "--recover-samples", "2", "--recover-alpha", "0.1",
            "--round-to", "4", "--random-seed", "3", "--heldout", "piqa", "--no-perplexity", *FAST_PROFILE]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    asked = {"sparsity": 0.25, "method": "diet", "merge": "weighted", "merge_tasks": ["rte", "boolq"],
             "aggregation": "l2", "recover": "lsq", "recover_samples": 2, "recover_alpha": 0.1, "round_to": 4,
             "random_seed": 3}
    assert {key: report["prune"]["settings"][key] for key in asked} == asked
    assert set(report["prune"]["task_agreement"]) == {"rte", "boolq"}
    assert report["prune"]["recovery"]["alpha"] == 0.1
    assert report["pruned"]["tasks"]["piqa"]["n"] == 3 and report["dense"]["tasks"]["rte"]["n"] == 3
    table = (out / "report.md").read_text()
    assert "| piqa (held out) | 3 |" in table
    # the report sets the paper's DIET (block outputs, no recovery, the same K) beside the configured one,
    # whose site auto became the linear layers' inputs because a refit follows
    assert "| paper DIET acc | paper DIET - dense (paired) | diet+norm-site+lsq acc |" in table
    assert report["prune"]["settings"]["site"] == "norm_output"
    assert report["paper"]["tasks"]["rte"]["ids"] == report["pruned"]["tasks"]["rte"]["ids"]
    assert report["disk_bytes"] == sum(f.stat().st_size for f in (out / "pruned").iterdir())
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    pruned = json.loads((out / "pruned" / "dietprune.json").read_text())
    assert pruned["hidden_size_after"] == 36
    # the evaluations skipped every calibration example the pruned model records (recovery's generic
    # LAMBADA passages are no task's: they are only ever excluded from perplexity)
    assert set(pruned["calibration"]) - set(report["pruned"]["tasks"]) == {"lambada"}
    for task, meta in pruned["calibration"].items():
        if task != "lambada":
            assert not set(meta["ids"]) & set(report["pruned"]["tasks"][task]["ids"])


def test_bench_end_to_end(tiny_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "p"), *FAST_PROFILE]) == 0
    out = tmp_path / "bench.json"
    argv = ["--quiet", "bench", str(tiny_dir), str(tmp_path / "p"), "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    dense, pruned = result["dense"], result["pruned"]
    assert dense["hidden_size"] == 48 and pruned["hidden_size"] == 40 and dense["params"] > pruned["params"]
    for metric in ("prefill_b1_tok_s", "prefill_b8_tok_s", "decode_b1_tok_s"):
        assert dense[metric] > 0 and pruned[metric] > 0
        assert result["speedup"][metric]["measured"] == pytest.approx(pruned[metric] / dense[metric])
    ideal = dense["prefill_flops_per_token"] / pruned["prefill_flops_per_token"]
    assert math.isclose(result["speedup"]["prefill_b1_tok_s"]["ideal"], ideal) and ideal > 1
    capsys.readouterr()
    assert main(["bench", str(tiny_dir), str(tmp_path / "missing")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_api_prunes_a_loaded_model_without_changing_it(tiny_dir, tmp_path):
    model, tokenizer = tiny_model("gemma3_text"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = dietprune.prune(model, tokenizer, sparsity=0.25, samples=4, tasks=("arc_easy", "boolq", "rte"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model stays
    assert pruned.model.config.hidden_size == 36
    dietprune.save(pruned, tmp_path / "api")
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "cli"), "--sparsity", "0.25",
                 *FAST_PROFILE]) == 0
    records = [json.loads((tmp_path / n / "dietprune.json").read_text()) for n in ("api", "cli")]
    assert records[0]["kept_dims"] == records[1]["kept_dims"]
    with pytest.raises(DietError, match="needs its tokenizer"):
        dietprune.prune(model)
    memory = {p.data_ptr() for p in model.parameters()}
    in_place = dietprune.prune(model, tokenizer, sparsity=0.25, samples=4, tasks=("arc_easy",), in_place=True,
                               recover="none")  # a refit keeps the dense model as its target: no reuse then
    assert in_place.model.get_input_embeddings().weight.data_ptr() in memory  # the dense memory, reused


def test_adapter_flags_refuse_what_an_algorithm_cannot_handle(monkeypatch):
    from dataclasses import replace

    from dietprune.methods.wanda_sp import WandaSP
    from dietprune.models import adapters
    from dietprune.slice import slice_model

    llama = adapters.ADAPTERS["llama"]
    monkeypatch.setitem(adapters.ADAPTERS, "llama", replace(llama, norm_with_bias=True))
    with pytest.raises(DietError, match="slicing cannot handle llama's norm with bias"):
        slice_model(tiny_model("llama"), torch.arange(32))
    monkeypatch.setitem(adapters.ADAPTERS, "llama", replace(llama, fused_qkv=True))
    with pytest.raises(DietError, match="wanda-sp cannot handle llama's fused qkv"):
        WandaSP(tiny_model("llama"), 1000)


def test_every_variant_is_valid_settings():
    from dietprune.methods import METHODS, VARIANTS
    from dietprune.settings import CalibrationSettings
    from dietprune.sweep import variant_settings

    for name in VARIANTS:
        settings, _ = variant_settings(name, PruneSettings(), CalibrationSettings(), 0.2)
        assert settings.method in METHODS
    assert {m.kind for m in METHODS.values()} == {"hidden", "structural"}


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_model_file_is_one_line(damaged, tiny_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    content = (model / damaged).read_bytes()
    (model / damaged).write_bytes(content[: len(content) // 2])
    capsys.readouterr()
    assert main(["prune", "--model", str(model), "--out", str(tmp_path / "o"), *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"diet: error: cannot load model {model}: ") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_damaged_records_and_cells_are_one_line(tiny_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "pruned"
    shutil.copytree(tiny_dir, model)
    (model / "dietprune.json").write_text("{\"kept_dims\": [1, 2")
    capsys.readouterr()
    assert main(["eval", str(model), "--tasks", "rte", "--limit", "2"]) == 2
    assert "dietprune.json is not a readable record of a pruned model" in capsys.readouterr().err
    cells = tmp_path / "sweep" / "cells"
    cells.mkdir(parents=True)
    (cells / "dense.json").write_text("{")
    assert main(["sweep", "--model", str(tiny_dir), "--out", str(tmp_path / "sweep"), "--methods", "diet",
                 "--sparsities", "0.25", "--limit", "2", *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    assert "dense.json is not a readable sweep cell (delete it to recompute it)" in err and "\n" not in err


@pytest.mark.parametrize(("words", "message"), [
    (["--mlp-sparsity", "0.5", "--recover", "none"], "--mlp-sparsity refits down_proj on the kept channels: "
                                                     "it needs --recover full, not none"),
    (["--mlp-sparsity", "1"], "--mlp-sparsity 1 removes all 80 MLP channels of a layer; at least one must "
                              "stay"),
])
def test_mlp_sparsity_refuses_what_it_cannot_do(words, message, tiny_dir, tmp_path, capsys):
    err = refused([*command_line("prune", tiny_dir, tmp_path), *FAST_PROFILE, *words], tmp_path, capsys)
    assert err == f"diet: error: {message}"


def test_a_linear_head_needs_the_full_refit(tiny_dir, tmp_path, capsys):
    err = refused([*command_line("prune", tiny_dir, tmp_path), *FAST_PROFILE, "--recover", "lsq",
                   "--recover-head", "linear"], tmp_path, capsys)
    assert err == "diet: error: --recover-head linear refits the head in --recover full, not lsq"


def test_a_damping_grid_needs_a_refit(tiny_dir, tmp_path, capsys):
    err = refused([*command_line("prune", tiny_dir, tmp_path), *FAST_PROFILE, "--recover", "none",
                   "--recover-alpha-grid", "0.01", "0.1"], tmp_path, capsys)
    assert err == ("diet: error: --recover-alpha-grid chooses the refit's damping: it needs --recover lsq "
                   "or full")
