"""The device check (benchmarks/gpu_check.py) runs here at toy sizes on the CPU, so the script a GPU
machine gets cannot rot: every part finishes, writes its JSON, and says what it measured."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_part_is_its_own_process_with_its_own_time_limit(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--smoke", "--parts",
                          "equivalence"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "equivalence: ok"
    result = json.loads((tmp_path / "equivalence.json").read_text())
    assert result["device"] == "cpu" and len(result["relative_max_difference"]) == 14
    assert max(v for k, v in result["relative_max_difference"].items() if k.endswith("float32")) < 1e-4


@pytest.mark.parametrize("part", ["scores", "engine_70b", "evaluator"])
def test_every_part_runs_at_toy_size(part, gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "cache"))
    gpu_check.run_part(part, tmp_path, "cpu", True, tmp_path / "work")
    result = json.loads((tmp_path / f"{part}.json").read_text())
    assert result["part"] == part and result["seconds"] > 0 and "status" not in result
    if part == "scores":
        assert all(v["same_mask"] and v["max_relative_difference"] == 0 for k, v in result.items()
                   if isinstance(v, dict))
    if part == "engine_70b":
        runs = [f"layers_{n}_recover_{r}" for n, r in ((2, "none"), (2, "full"), (4, "none"), (4, "full"),
                                                       (8, "none"))]
        assert all(result[run]["stages_s"]["calibrate"] > 0 for run in runs)
        assert [result[run]["recovery_s"] is None for run in runs] == [True, False, True, False, True]
        assert "projected_80_layers_full_s" in result
    if part == "evaluator":
        assert result["fp32_same_choice"] == 1.0 and result["requests"] == 40


def test_prune_9b_leaves_both_checkpoints_for_serving_which_removes_them(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    gpu_check.run_part("prune_9b", tmp_path, "cpu", True, work)
    result = json.loads((tmp_path / "prune_9b.json").read_text())
    assert set(result["stages_s"]) == {"calibrate", "build"} and result["kept"] < 64
    assert result["stock_reload_max_abs_logit_difference"] == 0.0  # saved == in memory, same dtype
    assert (work / "dense" / "config.json").exists() and (work / "pruned" / "config.json").exists()
    gpu_check.run_part("serving", tmp_path, "cpu", True, work)
    serving = json.loads((tmp_path / "serving.json").read_text())
    assert serving["dense"]["hidden_size"] == 64 and serving["pruned"]["hidden_size"] == result["kept"]
    assert set(serving["speedup"]) == {"prefill_b1_tok_s", "prefill_b8_tok_s", "decode_b1_tok_s"}
    assert not work.exists()


def test_a_failing_part_keeps_what_it_had_written_and_says_why(tmp_path):
    (tmp_path / "serving.json").write_text('{"stale": "an earlier run"}')
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--smoke", "--parts",
                          "serving"], capture_output=True, text=True, timeout=300)  # no checkpoints to bench
    assert run.returncode == 0 and run.stdout.startswith("serving: failed")
    result = json.loads((tmp_path / "serving.json").read_text())
    assert result["device"] == "cpu" and result["status"] == "failed" and "stale" not in result
    assert any("dense" in line for line in result["stderr_tail"])


def test_the_work_folder_goes_as_soon_as_no_later_part_needs_it(gpu_check, tmp_path, monkeypatch):
    """A part killed at its time limit cannot remove the 9B checkpoints; the next part must still have
    the disk (on the H200, a timed-out `serving` left 33 GB and the 70B part ran out of space)."""
    work, seen = tmp_path / "work", []

    def part(name, args, device, folder):
        seen.append((name, folder.exists()))
        if name == "prune_9b":
            folder.mkdir()

    monkeypatch.setattr(gpu_check, "run_in_own_process", part)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out"), "--work", str(work),
                                      "--parts", "prune_9b", "serving", "scores", "evaluator"])
    gpu_check.main()
    assert seen == [("prune_9b", False), ("serving", True), ("scores", False), ("evaluator", False)]
