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


@pytest.mark.parametrize("part", ["scores", "prune_9b", "engine_70b", "evaluator"])
def test_every_part_runs_at_toy_size(part, gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "cache"))
    gpu_check.run_part(part, tmp_path, "cpu", smoke=True)
    result = json.loads((tmp_path / f"{part}.json").read_text())
    assert result["part"] == part and result["seconds"] > 0
    if part == "scores":
        assert all(v["same_mask"] and v["max_relative_difference"] == 0 for k, v in result.items()
                   if isinstance(v, dict))
    if part == "prune_9b":
        assert set(result["stages_s"]) == {"calibrate", "build"} and result["kept"] < 64
    if part == "engine_70b":
        assert {"layers_2", "layers_4"} <= set(result)
    if part == "evaluator":
        assert result["fp32_same_choice"] == 1.0 and result["requests"] == 40
