"""Every hidden-dimension method gives a model of the same size through the same path, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_PROFILE, tiny_model

from dietprune.calibration import generic_corpus
from dietprune.cli import main
from dietprune.methods.magnitude import magnitude_scores
from dietprune.methods.random import random_scores

pytestmark = pytest.mark.usefixtures("isolated_cache")


def prune(tiny_dir: Path, out: Path, *flags: str) -> dict:
    assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--sparsity", "0.25",
                 *FAST_PROFILE, *flags]) == 0
    return json.loads((out / "dietprune.json").read_text())


@pytest.mark.parametrize("flags", [["--method", "diet"], ["--method", "diet", "--merge", "mean"],
                                   ["--method", "agnostic", "--samples", "2"], ["--method", "magnitude"],
                                   ["--method", "random"], ["--method", "magnitude", "--recover", "lsq"]])
def test_same_size_and_deterministic(tiny_dir, tmp_path, flags):
    first = prune(tiny_dir, tmp_path / "a", *flags)
    again = prune(tiny_dir, tmp_path / "b", *flags)
    assert first["hidden_size_after"] == 36 and len(first["kept_dims"]) == 36
    assert first["params_after"] == prune(tiny_dir, tmp_path / "ref", "--method", "random")["params_after"]
    assert first["kept_dims"] == again["kept_dims"]


def test_random_depends_on_the_seed():
    assert not torch.equal(random_scores(48, 0), random_scores(48, 1))
    assert torch.equal(random_scores(48, 3), random_scores(48, 3))


def test_random_seed_is_not_the_calibration_seed(tiny_dir, tmp_path):
    """--random-seed changes the ranking only: the recorded calibration draw (which evaluation
    excludes) stays --seed's, so every random seed is evaluated on the same examples as DIET."""
    from dietprune.settings import CalibrationSettings, PruneSettings
    from dietprune.sweep import variant_settings

    one = prune(tiny_dir, tmp_path / "a", "--method", "random", "--random-seed", "1")
    two = prune(tiny_dir, tmp_path / "b", "--method", "random", "--random-seed", "2")
    assert one["kept_dims"] != two["kept_dims"] and one["settings"]["random_seed"] == 1
    settings, profiled = variant_settings("random-2", PruneSettings(), CalibrationSettings(seed=5), 0.2)
    assert (settings.method, settings.random_seed, profiled.seed) == ("random", 2, 5)


def test_magnitude_ranks_a_silenced_dim_last():
    model = tiny_model("llama")
    with torch.no_grad():
        for name, param in model.named_parameters():
            readers = ("embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                       "gate_proj.weight", "up_proj.weight", "lm_head.weight")
            if name.endswith(readers):
                param[:, 5] = 0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param[5, :] = 0
    scores = magnitude_scores(model)
    assert scores.shape == (48,) and scores.argmin() == 5 and scores[5] == 0


def test_generic_text_is_lambada():
    corpus = generic_corpus(3)
    assert corpus.ids == ("0", "1", "2") and corpus.texts[0].startswith("In my palm is a clear stone")


@pytest.mark.parametrize("method", ["shortgpt", "wanda-sp"])
def test_structural_baselines_match_the_hidden_dim_size(tiny_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    record = prune(tiny_dir, tmp_path / method, "--method", method)
    target = prune(tiny_dir, tmp_path / "diet", "--method", "magnitude")["params_after"]
    structure = record["structure"]
    unit = structure["layer_params"] if method == "shortgpt" else structure["channel_params"]
    assert record["hidden_size_after"] == 48 and abs(record["params_after"] - target) <= unit / 2
    assert structure["target_params"] == target and record["params_after"] < record["params_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    assert sum(p.numel() for p in reloaded.parameters()) == record["params_after"]
    assert set(record["calibration"]) == {"arc_easy", "boolq", "rte"}  # excluded from evaluation
    assert prune(tiny_dir, tmp_path / f"{method}-again", "--method", method)["structure"] == structure


def test_structural_baselines_refuse_hidden_dim_options(tiny_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--method", "shortgpt",
                 "--recover", "lsq", *FAST_PROFILE]) == 2
    assert "--recover does not apply" in capsys.readouterr().err


def test_sliced_param_count_is_what_slicing_gives(model_type):
    from dietprune.slice import slice_model, sliced_param_count

    model = tiny_model(model_type)
    sliced = slice_model(model, torch.arange(32))
    assert sliced_param_count(model, 32) == sum(p.numel() for p in sliced.parameters())
