"""`diet sweep` on a tiny model: every cell pruned to the same size, tables and plot written, resumable."""

from __future__ import annotations

import json

import pytest
from conftest import FAST_PROFILE

import dietprune.sweep
from dietprune.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cache")
VARIANTS = ["diet", "norm-site", "relative", "act-weight", "only-rte", "samples-10"]


def test_sweep_cells_table_plot_and_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tiny_dir), "--out", str(out), "--methods", *VARIANTS,
            "--sparsities", "0.25", "--limit", "2", "--heldout", "piqa", *FAST_PROFILE]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    assert set(cells) == {"dense"} | {f"{v}-s25-none" for v in VARIANTS}
    assert {len(cells[f"{v}-s25-none"]["kept_dims"]) for v in VARIANTS} == {36}
    assert len({tuple(cells[f"{v}-s25-none"]["kept_dims"]) for v in VARIANTS}) > 3  # they differ
    assert cells["samples-10-s25-none"]["prune"]["settings"]["samples"] == 10
    assert cells["norm-site-s25-none"]["prune"]["settings"]["site"] == "norm_output"
    assert cells["only-rte-s25-none"]["prune"]["task_agreement"] == {"rte": 36}
    assert set(cells["diet-s25-none"]["tasks"]) == {"arc_easy", "boolq", "rte", "piqa"}
    assert cells["dense"]["perplexity"]["texts"] == 256
    table = (out / "results.md").read_text()
    assert "| only-rte |" in table and "piqa (held out)" in table and "avg - diet |" in table
    lines = table.splitlines()
    column = next(line for line in lines if line.startswith("| method")).split("|").index(" avg - diet ")
    delta = {line.split("|")[1].strip(): line.split("|")[column].strip() for line in lines
             if line.startswith(("| diet |", "| only-rte |"))}
    assert delta["diet"] == "–"  # no difference to itself
    assert delta["only-rte"][0] in "+-" and " ± " in delta["only-rte"]
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")

    def no_recompute(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(dietprune.sweep, "_prune_and_evaluate", no_recompute)
    monkeypatch.setattr(dietprune.sweep, "evaluate", no_recompute)
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    averages = json.loads(capsys.readouterr().out)
    assert averages["diet-s25-none"] == cells["diet-s25-none"]["average"]
    assert main([*argv, "--limit", "3"]) == 2  # other examples: refused, not mixed
    assert "was evaluated with --limit 2, not 3: use another --out" in capsys.readouterr().err
    assert main([*argv, "--site", "norm_output"]) == 2  # diet's cell was profiled at block outputs
    assert "diet-s25-none.json was profiled with another site: use another --out" in capsys.readouterr().err


def test_a_method_that_does_not_apply_is_reported_not_cached(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tiny_dir), "--out", str(out), "--methods", "diet", "slicegpt",
            "--sparsities", "0.25", "--limit", "2", "--heldout", "piqa", *FAST_PROFILE]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert "| slicegpt | – | n/a: slicegpt needs pre-norm blocks" in table
    assert "| diet | " in table and "** ± " in table  # the average with its standard error
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["dense.json", "diet-s25-none.json"]
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_paired_difference_counts_the_same_examples():
    from dietprune.errors import DietError
    from dietprune.metrics import paired_difference

    reference = {"tasks": {"a": {"ids": ["0", "1", "2", "3"], "correct": [1, 0, 0, 1]},  # 2 of 4 right
                           "b": {"ids": ["0", "1"], "correct": [1, 1]}}}  # 2 of 2
    cell = {"tasks": {"a": {"ids": ["0", "1", "2", "3"], "correct": [1, 1, 1, 1]},  # 4 of 4
                      "b": {"ids": ["0", "1"], "correct": [0, 1]}}}  # 1 of 2
    delta, err = paired_difference(cell, reference, ["a", "b"])
    assert delta == pytest.approx((0.5 - 0.5) / 2)
    # per-example differences: a = [0, 1, 1, 0] (var 1/3, n 4), b = [-1, 0] (var 1/2, n 2)
    assert err == pytest.approx(((1 / 3) / 4 + (1 / 2) / 2) ** 0.5 / 2)
    cell["tasks"]["b"]["ids"] = ["1", "0"]
    with pytest.raises(DietError, match="different examples"):
        paired_difference(cell, reference, ["a", "b"])


def test_paired_difference_of_the_headline_score_uses_acc_norm_where_reported():
    from dietprune.metrics import paired_difference

    def result(correct, norm):
        return {"ids": ["0", "1"], "metrics": ["acc", "acc_norm"], "correct": correct, "correct_norm": norm}

    cell, reference = {"tasks": {"a": result([1, 1], [0, 0])}}, {"tasks": {"a": result([0, 0], [1, 1])}}
    assert paired_difference(cell, reference, ["a"], "acc")[0] == pytest.approx(1.0)
    assert paired_difference(cell, reference, ["a"], "score")[0] == pytest.approx(-1.0)


def test_seed_mean_averages_correctness_per_example():
    from dietprune.errors import DietError
    from dietprune.metrics import paired_difference, seed_mean

    ids = ["0", "1", "2", "3"]
    seeds = [{"tasks": {"a": {"ids": ids, "correct": [1, 1, 0, 0]}}, "prune": {"params_after": 7}},
             {"tasks": {"a": {"ids": ids, "correct": [1, 0, 0, 1]}}, "prune": {"params_after": 7}}]
    mean = seed_mean(seeds, ["a"])
    assert mean["tasks"]["a"]["correct"] == [1.0, 0.5, 0.0, 0.5]
    assert mean["tasks"]["a"]["acc"] == pytest.approx(0.5)
    assert mean["tasks"]["a"]["acc_stderr"] == pytest.approx((0.5 / 3) ** 0.5 / 2)
    reference = {"tasks": {"a": {"ids": ids, "correct": [0, 1, 1, 0]}}}
    delta, _ = paired_difference(mean, reference, ["a"])
    assert delta == pytest.approx(0.0)  # [1, -0.5, -1, 0.5]
    seeds[1]["tasks"]["a"]["ids"] = ids[::-1]
    with pytest.raises(DietError, match="different examples"):
        seed_mean(seeds, ["a"])
