"""The GPU path's defects found by reading (issue 24), each shown on the CPU where a CPU can show it: a
second device stood in for by accelerate's disk offload, a mocked GPU memory size, or torchrun's
environment without a process group."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import FAST_PROFILE, profile_texts, tiny_config, tiny_model, tiny_tokenizer
from test_device import offloaded
from transformers import AutoModelForCausalLM

import dietprune
from dietprune.api import evaluate
from dietprune.cli import main
from dietprune.device import offload_folder
from dietprune.errors import DietError

pytestmark = pytest.mark.usefixtures("isolated_cache")
TEXTS = ["the a is of b c", "Question: is the a ? Answer: yes", "a b c d e f g h i j k", "x y z"]


def test_the_fingerprint_moves_no_weight_and_unties_nothing():
    """It used to copy every weight to the host and back into new Parameters (untying the head)."""
    from dietprune.scores import model_fingerprint
    from dietprune.sequential import Weights

    model = tiny_model("gemma3_text")
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    first = model_fingerprint(Weights.of(model))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model_fingerprint(Weights.of(model)) == first  # memoised while nothing changes
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] += 1e-3
    assert model_fingerprint(Weights.of(model)) != first


@pytest.mark.parametrize("method", ["magnitude", "shortgpt", "wanda-sp", "act-weight"])
def test_baselines_read_offloaded_weights_through_the_engine(method, tmp_path):
    """magnitude, wanda-sp and shortgpt read weights that accelerate keeps on disk (meta tensors in the
    model) as the sequential engine onloads each block: the same choice as in memory."""
    options = dict(sparsity=0.25, samples=4, tasks=("arc_easy", "rte"), method=method)
    expected = dietprune.prune(tiny_model("gemma3_text"), tiny_tokenizer(), **options).record
    got = dietprune.prune(offloaded(tmp_path), tiny_tokenizer(), **options).record
    assert got["kept_dims"] == expected["kept_dims"] and got.get("structure") == expected.get("structure")
    assert got["params_after"] == expected["params_after"]


def test_an_offloaded_model_recovers_fully_to_the_same_checkpoint(tmp_path):
    """Full recovery of a model partly on disk: each dense block onloaded once, refit where it computes,
    no copy of the final norm's offload hook (which held the whole offloaded state dict)."""
    options = dict(sparsity=0.25, samples=4, tasks=("arc_easy", "rte"), recover="full", recover_samples=2)
    expected = dietprune.prune(tiny_model("gemma3_text"), tiny_tokenizer(), **options)
    got = dietprune.prune(offloaded(tmp_path), tiny_tokenizer(), **options)
    for name, pruned in (("expected", expected), ("got", got)):
        dietprune.save(pruned, tmp_path / name)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in ("expected", "got"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_profile_sums_live_where_the_model_computes_not_on_meta(tmp_path):
    got = profile_texts(offloaded(tmp_path), TEXTS)
    assert got.sum_abs.device.type == "cpu" and got.sum_abs.isfinite().all()
    assert torch.allclose(got.sum_abs, profile_texts(tiny_model("gemma3_text"), TEXTS).sum_abs, rtol=1e-5)


def test_every_dispatch_offloads_to_a_fresh_folder(tmp_path):
    """accelerate reuses an existing offload index: two dispatches sharing a folder (the pid's, before)
    would evaluate or save the first model's weights."""
    first, second = offload_folder(), offload_folder()
    assert first != second and first.is_dir() and second.is_dir() and not any(first.iterdir())
    pruned = [dietprune.prune(offloaded(tmp_path / str(s)), tiny_tokenizer(), sparsity=s, samples=4,
                              tasks=("arc_easy",), recover="none") for s in (0.25, 0.5)]
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, sparsity in zip(pruned, (0.25, 0.5), strict=True):
            direct = dietprune.prune(tiny_model("gemma3_text"), tiny_tokenizer(), sparsity=sparsity,
                                     samples=4, tasks=("arc_easy",), recover="none")
            assert torch.allclose(p.model(ids).logits, direct.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--limit", "2"], "diet eval does not run data parallel; run it without torchrun"),
    (["prune", "--device-map", "auto"], "--device-map spreads one model over every GPU"),
])
def test_torchrun_refuses_what_it_cannot_run(argv, message, tiny_dir, tmp_path, capsys, monkeypatch):
    """Under torchrun only profile and prune run (profiling is sharded); a command each process would
    repeat, racing on one output, or a device map over every GPU in every process is one line, before
    any process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    model = [str(tiny_dir)] if argv[0] == "eval" else ["--model", str(tiny_dir)]
    capsys.readouterr()
    assert main([argv[0], *model, *argv[1:], "--out", str(tmp_path / "o"), *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "o").exists()
    assert not torch.distributed.is_initialized()


def test_the_checkpoint_holds_what_was_computed(tmp_path):
    """A float32 source pruned in bfloat16 (a GPU's default) is saved in bfloat16, not as float32
    containers of bfloat16-rounded values; the record says both dtypes."""
    source = tmp_path / "fp32"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    assert main(["--quiet", "prune", "--model", str(source), "--out", str(tmp_path / "p"), "--dtype",
                 "bfloat16", *FAST_PROFILE]) == 0
    record = json.loads((tmp_path / "p" / "dietprune.json").read_text())
    assert record["saved_dtype"] == "bfloat16" and record["settings"]["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").dtype == torch.bfloat16


def test_an_in_memory_pruned_model_is_evaluated_without_its_calibration_samples():
    """evaluate(pruned) used to pass the record where the stored dtype goes: the samples it was
    calibrated on (here seed 3's, not the default subsets) were then evaluated."""
    pruned = dietprune.prune(tiny_model("gemma3_text"), tiny_tokenizer(), sparsity=0.25, samples=20,
                             seed=3, tasks=("rte",), recover="none")
    used = set(pruned.record["calibration"]["rte"]["ids"])
    results = evaluate(pruned, limit=None, tasks=("rte",), heldout=(), perplexity=False,
                                     samples=20, seed=3)
    evaluated = set(results["tasks"]["rte"]["ids"])
    assert used and not used & evaluated and len(evaluated) == 277 - len(used)


def test_batches_grow_with_gpu_memory(monkeypatch):
    """Token budgets tuned for two CPU cores (4,096 calibration, 2,048 evaluation tokens, 128 head rows)
    stay on the CPU; on a GPU they follow its free memory."""
    from dietprune.engine import budget
    from dietprune.plan import batch_tokens

    model = type("Shape", (), {"config": tiny_config("llama", hidden_size=4096, num_attention_heads=32)})
    assert batch_tokens(torch.device("cpu"), 4096) == 4096
    assert budget(model, torch.device("cpu")) == (2048, 128)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert batch_tokens(torch.device("cuda", 0), 4096) == 16384
    tokens, chunk = budget(model, torch.device("cuda", 0))
    assert tokens == 16384 and chunk == 8192


def test_a_process_group_is_joined_with_the_backend_of_its_device(monkeypatch):
    """NCCL only for processes that compute on a GPU; a CPU run under torchrun (even where CUDA exists)
    uses gloo, and the group is left when the process ends."""
    import dietprune.device as device

    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    device.init_distributed(torch.device("cpu"), None)
    assert joined == ["gloo"]
    with pytest.raises(DietError, match="process 1 computes on cuda:1, not cuda:0"):
        device.init_distributed(torch.device("cuda", 0), None)
    assert os.environ["WORLD_SIZE"] == "2"


def test_cuda_under_torchrun_is_the_process_s_own_gpu(monkeypatch):
    """`--device cuda` (or auto) under torchrun resolves to the LOCAL_RANK GPU, which the process group
    accepts (it used to refuse `cuda` for every process, naming `cuda` as the fix)."""
    import dietprune.device as device
    from dietprune.plan import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for name in ("cuda", "auto", "cuda:1"):
        assert resolve_device(name) == torch.device("cuda", 1)
        device.init_distributed(resolve_device(name), None)
    assert joined == ["nccl"] * 3
    monkeypatch.setenv("WORLD_SIZE", "1")  # outside torchrun: torch's current GPU, as before
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda", 1)
