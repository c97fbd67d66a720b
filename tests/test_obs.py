"""obs: greedy structured OBS on the residual axis (methods/obs.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_PROFILE, batching, tiny_model, tiny_tokenizer

from dietprune.cli import main
from dietprune.lstsq import removal_order
from dietprune.methods.obs import ReaderGrams

pytestmark = pytest.mark.usefixtures("isolated_cache")


def refit_error(x: torch.Tensor, readers: torch.Tensor, dropped: list[int]) -> float:
    """The readers' output error, relative to its energy, after dropping input dims and refitting the
    kept columns by least squares (what recovery does)."""
    kept = [i for i in range(x.shape[1]) if i not in dropped]
    target = x @ readers.T
    fit = torch.linalg.lstsq(x[:, kept], target).solution
    return float((x[:, kept] @ fit - target).square().sum() / target.square().sum())


def test_step_costs_add_up_to_the_refit_error():
    """Undamped, the greedy's costs summed over the removed dims are the least-squares refit's error on
    every site, exactly, after each step: the recursion is OBS, not an approximation."""
    torch.manual_seed(0)
    d, sites = 7, 3
    xs = [torch.randn(300, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
          for _ in range(sites)]
    readers = [torch.randn(5, d, dtype=torch.float64) for _ in range(sites)]
    forms = torch.stack([r.T @ r for r in readers])
    grams = torch.stack([x.T @ x for x in xs])
    order, costs = removal_order(forms, grams, 4, alpha=0.0)
    assert len(set(order.tolist())) == 4
    for n in range(1, 5):
        brute = sum(refit_error(x, r, order[:n].tolist()) for x, r in zip(xs, readers, strict=True))
        assert float(costs[:n].sum()) == pytest.approx(brute, rel=1e-9)
    first = [sum(refit_error(x, r, [j]) for x, r in zip(xs, readers, strict=True)) for j in range(d)]
    assert int(order[0]) == min(range(d), key=first.__getitem__)


def test_a_dim_the_others_predict_goes_before_a_small_independent_one():
    """Dims 0 and 1 carry the same large signal, dim 2 a small one of its own: mean |a| would drop dim 2
    first; the refit loses nothing when one copy goes, so obs drops a copy."""
    torch.manual_seed(1)
    signal, small = torch.randn(500, 1, dtype=torch.float64) * 10, torch.randn(500, 1, dtype=torch.float64)
    x = torch.cat([signal, signal + 1e-3 * torch.randn_like(signal), small, 3 * torch.randn(500, 2)], 1)
    gram = (x.T @ x)[None]
    order, _ = removal_order(torch.eye(5, dtype=torch.float64)[None], gram, 2, alpha=1e-6)
    assert int(order[0]) in (0, 1) and x.abs().mean(0).argmin() == 2


def test_grams_are_the_norm_outputs_over_real_tokens():
    """The observer's Gram matrices are those of every norm's output (and the final norm's) on the real
    tokens of each corpus, and its forms are the stacked readers' R^T R."""
    from dietprune.calibration import Corpus
    from dietprune.profile import profile
    from dietprune.sequential import Weights

    model, tokenizer = tiny_model("llama").double(), tiny_tokenizer()
    corpora = [Corpus("a", ("0", "1"), ("the a is b", "no c")), Corpus("b", ("0",), ("yes d of e ."))]
    weights = Weights.of(model)
    grams = ReaderGrams(weights, len(corpora))
    profile(weights, tokenizer, corpora, ("norm_output",), batching(), (grams,))
    forms, per_corpus = grams.result()

    norms = [m for name, m in model.named_modules() if name.endswith(("layernorm", "model.norm"))]
    expected = torch.zeros_like(per_corpus, dtype=torch.float64)
    for c, corpus in enumerate(corpora):
        seen: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out[0])) for m in norms]
        for text in corpus.texts:
            with torch.no_grad():
                model(**tokenizer(text, return_tensors="pt"))
        for hook in hooks:
            hook.remove()
        per_site = len(norms)
        for s in range(per_site):
            outputs = torch.cat(seen[s::per_site])
            expected[c, s] = outputs.T @ outputs
    torch.testing.assert_close(per_corpus.double(), expected, rtol=1e-6, atol=1e-6)
    layer = model.model.layers[0]
    q, k, v = (layer.self_attn.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj"))
    torch.testing.assert_close(forms[0], q.T @ q + k.T @ k + v.T @ v)
    torch.testing.assert_close(forms[-1], model.lm_head.weight.T @ model.lm_head.weight)


def test_prune_with_obs_keeps_exact_k_deterministically(tiny_dir, tmp_path):
    records = []
    for out in ("a", "b"):
        assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / out), "--sparsity", "0.25",
                     "--method", "obs", *FAST_PROFILE]) == 0
        records.append(json.loads((tmp_path / out / "dietprune.json").read_text()))
    assert len(records[0]["kept_dims"]) == records[0]["hidden_size_after"] == 36
    assert records[0]["kept_dims"] == records[1]["kept_dims"]
    assert set(records[0]["task_agreement"]) == {"arc_easy", "boolq", "rte"}
    assert records[0]["recovery"]["parts"]  # auto recovers a hidden-dim method


def test_obs_refuses_a_score_file(tiny_dir, tmp_path, capsys):
    scores = tmp_path / "scores.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(scores), *FAST_PROFILE]) == 0
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_dir), "--scores", str(scores), "--method", "obs",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("diet: error: obs scores from Gram matrices a score file does not hold: --scores does "
                   "not apply") and not (tmp_path / "o").exists()
