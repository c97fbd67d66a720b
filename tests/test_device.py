"""Placement on the CPU path: device and dtype choices, the saved dtype, models that do not fit,
running out of memory, accelerate-dispatched (offloaded) models and data-parallel profiling."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch
from conftest import FAST_PROFILE, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import dietprune
from dietprune.cli import main
from dietprune.errors import DietError
from dietprune.plan import compute_dtype, resolve_device

pytestmark = pytest.mark.usefixtures("isolated_cache")


def header_dtypes(path) -> set[str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {t["dtype"] for name, t in header.items() if name != "__metadata__"}


def test_auto_is_the_cpu_in_float32_here_and_bfloat16_on_a_gpu():
    assert not torch.cuda.is_available()  # CI and this test: no GPU
    assert resolve_device("auto") == torch.device("cpu")
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(device, tiny_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"diet: error: --device {device}: no CUDA device is available here (torch sees none); " \
                  "use --device cpu or auto"
    assert not (tmp_path / "o").exists()


def test_the_checkpoint_keeps_the_dtype_its_source_stores(tmp_path):
    """A bfloat16 source gives a bfloat16 checkpoint (about (1 - s) x its bytes), whatever the compute
    dtype; --save-dtype overrides."""
    source = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    assert main(["prune", "--model", str(source), "--out", str(tmp_path / "a"), "--sparsity", "0.25",
                 *FAST_PROFILE]) == 0
    record = json.loads((tmp_path / "a" / "dietprune.json").read_text())
    assert record["saved_dtype"] == "bfloat16" and record["settings"]["dtype"] == "auto"
    assert header_dtypes(tmp_path / "a" / "model.safetensors") == {"BF16"}
    sizes = [(path / "model.safetensors").stat().st_size for path in (tmp_path / "a", source)]
    assert 0.74 < sizes[0] / sizes[1] < 0.78  # 36 of 48 dims: 0.75, plus the norms and the header
    assert main(["prune", "--model", str(source), "--out", str(tmp_path / "b"), "--sparsity", "0.25",
                 "--save-dtype", "float32", *FAST_PROFILE]) == 0
    assert header_dtypes(tmp_path / "b" / "model.safetensors") == {"F32"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a").dtype == torch.bfloat16
    assert oct((tmp_path / "a" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saving_a_copy_in_another_dtype_leaves_the_model_in_memory_alone(tmp_path):
    model, tokenizer = tiny_model("gemma3_text"), tiny_tokenizer()
    pruned = dietprune.prune(model, tokenizer, sparsity=0.25, samples=4, tasks=("rte",),
                             save_dtype="bfloat16")
    before = {k: v.clone() for k, v in pruned.model.state_dict().items()}
    dietprune.save(pruned, tmp_path / "p")
    assert all(torch.equal(before[k], v) for k, v in pruned.model.state_dict().items())
    assert pruned.model.dtype == torch.float32
    assert header_dtypes(tmp_path / "p" / "model.safetensors") == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still tied


def test_gguf_records_the_dtype_it_stores(tmp_path):
    import gguf
    import numpy as np

    from dietprune.models.load import _check_gguf_types

    def write(name: str, kinds: list) -> object:
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "llama")
        for i, kind in enumerate(kinds):
            data = np.zeros(64, dtype=np.float32) if kind is None else \
                np.zeros(gguf.GGML_QUANT_SIZES[kind][1], dtype=np.uint8)
            writer.add_tensor(f"t{i}", data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    assert _check_gguf_types(write("f32.gguf", [None])) == "float32"
    assert _check_gguf_types(write("q8.gguf", [None, gguf.GGMLQuantizationType.Q8_0])) == "bfloat16"


def test_a_conversion_without_its_record_is_made_again(tmp_path, monkeypatch):
    """A GGUF cache converted before the stored dtype was recorded would save pruned models in float32:
    it is converted again, replacing the old one; a complete cache is reused."""
    from safetensors.torch import save_file

    from dietprune.models import load

    calls = []
    monkeypatch.setattr(load, "_convert_gguf", lambda gguf, target, if_exists, *why: calls.append(if_exists))
    target = tmp_path / "m"
    load._converted(tmp_path / "x.gguf", target)  # nothing there yet
    target.mkdir()
    (target / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, target / "model.safetensors")
    load._converted(tmp_path / "x.gguf", target)  # an old conversion: no record
    (target / load.SOURCE_RECORD).write_text('{"stored_dtype": "bfloat16"}')
    load._converted(tmp_path / "x.gguf", target)  # complete
    assert calls == ["discard", "replace"]


def test_a_model_larger_than_the_device_is_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    import dietprune.device

    monkeypatch.setattr(dietprune.device, "free_memory", lambda device: 1000)
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs 0.0 GiB for its weights in float32 and cpu (host memory) has 0.0 GiB free" in err
    assert "--device-map auto" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_running_out_of_memory_mid_run_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    import dietprune.pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dietprune.pipeline, "profile", out_of_memory)
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diet: error: out of memory on auto (CUDA out of memory. Tried to allocate "
                          "2.00 GiB)")
    assert "--batch-size" in err and "\n" not in err and not (tmp_path / "o").exists()


def offloaded(tmp_path, model_type: str = "gemma3_text"):
    """A tiny model dispatched by accelerate with two of its three layers offloaded to disk."""
    path = tmp_path / "dense"
    tiny_model(model_type).save_pretrained(path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map,
                                                 offload_folder=tmp_path / "offload").eval()
    assert any(p.device.type == "meta" for p in model.parameters())
    return model


@pytest.mark.parametrize("recover", ["none", "lsq"])
def test_an_offloaded_model_prunes_to_the_same_checkpoint(recover, tmp_path):
    options = dict(sparsity=0.25, samples=4, tasks=("arc_easy", "rte"), recover=recover, recover_samples=2)
    expected = dietprune.prune(tiny_model("gemma3_text"), tiny_tokenizer(), **options)
    got = dietprune.prune(offloaded(tmp_path), tiny_tokenizer(), **options)
    assert got.record["kept_dims"] == expected.record["kept_dims"]
    dietprune.save(expected, tmp_path / "expected")
    dietprune.save(got, tmp_path / "got")
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in ("expected", "got"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), recover


def test_device_map_auto_on_the_cpu_gives_the_same_model(tiny_dir, tmp_path):
    for name, extra in (("plain", []), ("mapped", ["--device-map", "auto"])):
        assert main(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / name), *FAST_PROFILE,
                     *extra]) == 0
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in ("plain", "mapped")]
    assert weights[0] == weights[1]


def test_torchrun_profiles_data_parallel_like_one_process(tiny_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m dietprune.cli profile` (gloo here, NCCL on GPUs): each process
    profiles every second text, the sums are all-reduced, one process writes the same scores."""
    single = tmp_path / "single.safetensors"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(single), *FAST_PROFILE]) == 0
    double = tmp_path / "double.safetensors"
    run = _torchrun(["profile", "--model", str(tiny_dir), "--out", str(double), *FAST_PROFILE], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    from dietprune.scores import load_scores

    (one, meta_one), (two, meta_two) = load_scores(single), load_scores(double)
    assert meta_one["tasks"] == meta_two["tasks"]  # the same samples, tokens counted over both shards
    for task in one:
        assert two[task].tokens == one[task].tokens
        assert torch.allclose(two[task].sum_abs, one[task].sum_abs, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _torchrun(args: list[str], tmp_path, processes: int = 2, entry: tuple[str, ...] = ("-m", "dietprune.cli")
              ) -> subprocess.CompletedProcess:
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / f"cache{processes}"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           "--master-port", str(_free_port()), *entry, "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("model_type", "options"), [
    ("gemma3_text", ["--method", "obs"]), ("gemma3_text", ["--recover-head", "linear"]),
    ("gemma3_text", ["--method", "wanda-sp"]), ("gemma3_text", ["--method", "shortgpt"]),
    ("llama", ["--method", "slicegpt"])])
def test_torchrun_prunes_data_parallel_like_one_process(model_type, options, tiny_dir, tmp_path):
    """`torchrun ... prune`: the mask's statistics (obs's Gram matrices, which a process's shard alone
    would get wrong), every recovery statistic (the tied linear head's too) and the structural methods'
    (channel norms, block influence, covariance) are summed over the processes (each refits on its own
    share of the recovery texts), so the streamed checkpoint the first process writes is the single
    process's; nothing else is left."""
    model = tiny_dir
    if model_type != "gemma3_text":
        model = tmp_path / model_type
        tiny_model(model_type).save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
    args = ["prune", "--model", str(model), *FAST_PROFILE, *options, "--weights", "stream"]
    texts = tmp_path / "texts"  # how many recovery texts each process refits on
    texts.mkdir()
    launcher = _launcher(tmp_path, "import dietprune.recover as recover\n"
                         "batches = recover.corpus_batches\n"
                         "def counted(*args, **kwargs):\n"
                         "    made = batches(*args, **kwargs)\n"
                         f"    open({str(texts)!r} + '/' + os.environ.get('RANK', 'single'), 'w').write(\n"
                         "        str(sum(len(b['input_ids']) for b in made[0])))\n"
                         "    return made\n"
                         "recover.corpus_batches = counted\n")
    out = ["--out", str(tmp_path / "single")]
    single = subprocess.run([sys.executable, str(launcher), "--quiet", *args, *out],
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    run = _torchrun([*args, "--out", str(tmp_path / "double")], tmp_path, entry=(str(launcher),))
    assert run.returncode == 0, run.stderr[-2000:]
    shares = {p.name: int(p.read_text()) for p in texts.iterdir()}
    recovers = "--method" not in options or options[1] == "obs"
    assert not recovers or shares["0"] + shares["1"] == shares["single"] and 0 < shares["1"] <= shares["0"]
    from safetensors.torch import load_file

    records = [json.loads((tmp_path / n / "dietprune.json").read_text()) for n in ("single", "double")]
    assert records[0]["kept_dims"] == records[1]["kept_dims"]
    assert _close(records[0].get("structure"), records[1].get("structure"))  # layers, heads, channels cut
    assert ("recovery" in records[1]) == recovers
    one, two = ({k: v for f in sorted((tmp_path / n).glob("*.safetensors")) for k, v in load_file(f).items()}
                for n in ("single", "double"))
    assert one.keys() == two.keys()
    for name in one:  # float32 products summed in another order (as another --batch-size gives)
        assert (two[name] - one[name]).abs().max() <= 1e-3 * one[name].abs().max(), name
    left = {"cache", "cache2", "double", "launch.py", "single", "texts"} | ({model_type} - {"gemma3_text"})
    assert {p.name for p in tmp_path.iterdir()} <= left  # no staging folder (caches: where it profiles)


def test_torchrun_holds_out_batches_in_shards_of_any_size(tiny_dir, tmp_path):
    """With a damping grid every process keeps held-out statistics, even one whose shard is too short
    to hold a batch out (here 4 batches and 3): the processes' all-reduced tensors have one shape (else
    gloo aborts, NCCL hangs) and every fit chooses one damping."""
    run = _torchrun(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--tasks", "arc_easy",
                     "--samples", "7", "--batch-size", "1", "--recover-generic", "0", "--recover-alpha-grid",
                     "0.01", "0.1", "1"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    recovery = json.loads((tmp_path / "out" / "dietprune.json").read_text())["recovery"]
    assert sum(recovery["alpha_chosen"].values()) == 3 * 7  # 3 layers x (q, k, v, o, gate, up, down)


def test_a_corpus_counts_as_cached_only_where_every_process_has_it(tiny_dir, tmp_path, monkeypatch):
    """Each process with a cache of its own (nodes that do not share one), only the first holding the
    scores: a corpus counts as cached only where every process finds it, so all of them profile it
    (and meet in the same collectives) and the mask is the single process's."""
    single = tmp_path / "single"
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "cache0"))
    assert main(["prune", "--model", str(tiny_dir), "--out", str(single), *FAST_PROFILE]) == 0
    launcher = _launcher(tmp_path, f"os.environ['DIETPRUNE_CACHE'] = {str(tmp_path / 'cache')!r} + "
                         "os.environ['LOCAL_RANK']\n")  # process i's cache: cache0, cache1
    run = _torchrun(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "double"), *FAST_PROFILE],
                    tmp_path, entry=(str(launcher),))
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads((tmp_path / n / "dietprune.json").read_text()) for n in ("single", "double")]
    assert records[0]["kept_dims"] == records[1]["kept_dims"]


def test_more_processes_than_texts_is_one_line(tiny_dir, tmp_path):
    """A process whose shard would be empty (here of the texts recovery refits on; profiling shards
    through the same function) makes every process stop with the same line (none waits for the others'
    collectives)."""
    run = _torchrun(["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--samples", "4",
                     "--tasks", "arc_easy", "--recover-samples", "2", "--recover-generic", "0"], tmp_path, 3)
    assert run.returncode != 0
    assert "diet: error: 3 processes each take a share of the calibration texts, but the largest " \
           "calibration set holds 2; run at most 2 processes" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recover", ["full", "none"])
def test_only_the_first_process_keeps_the_pruned_model(recover, tiny_dir, tmp_path, monkeypatch):
    """A data-parallel process after the first computes the same refit blocks and keeps none: no
    checkpoint written (N processes would write N), no model held, no tensor read for it (the
    embedding, a plain slice's blocks)."""
    import dietprune.assemble
    import dietprune.head_refit
    import dietprune.pipeline

    for module in (dietprune.pipeline, dietprune.head_refit):
        monkeypatch.setattr(module, "is_main_process", lambda: False)
    read = []
    monkeypatch.setattr(dietprune.assemble, "rest_tensors", lambda *args: read.append(args) or [])
    monkeypatch.setattr(dietprune.head_refit, "head_gram", lambda *args: read.append(args))
    staging = tmp_path / "staging"
    pruned = dietprune.prune(str(tiny_dir), **_fast_options(), weights="stream", staging=staging,
                             recover=recover)
    assert pruned.model is None and pruned.checkpoint is None
    assert not staging.exists() and read == []
    with pytest.raises(DietError, match="under torchrun only the first one does"):
        dietprune.save(pruned, tmp_path / "out")
    assert pruned.record["hidden_size_after"] == pruned.record["width"]["kept"]
    assert ("recovery" in pruned.record) == (recover == "full")


def test_a_process_after_the_first_shows_no_progress_or_warnings(tiny_dir, tmp_path, monkeypatch, capsys,
                                                                   caplog):
    """Under torchrun only the first process draws progress bars and warns; the others stay quiet but
    for errors."""
    import logging

    import dietprune.calibration
    import dietprune.pipeline  # noqa: F401  (bound to the real is_main_process before it is patched)

    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)  # restored after the test
    argv = ["prune", "--model", str(tiny_dir), *FAST_PROFILE, "--sparsity", "0.25"]  # K 36: a warning
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert "profile 3 tasks" in capsys.readouterr().err
    assert any("K 36 (sparsity 0.25) is not a multiple of" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(dietprune.calibration, "is_main_process", lambda: False)
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0
    assert capsys.readouterr().err == "" and caplog.records == [] and not (tmp_path / "second").exists()


def test_a_process_that_stopped_stops_the_others_with_one_line(monkeypatch):
    """When a peer is gone (its own error line said why), a collective's RuntimeError becomes one line."""
    import dietprune.calibration as calibration

    def gone(tensor):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")

    monkeypatch.setattr(calibration, "process_group", lambda: (1, 2))
    monkeypatch.setattr(calibration.dist, "all_reduce", gone)
    with pytest.raises(DietError) as error:
        calibration.all_sum(torch.zeros(3))
    assert str(error.value) == ("another data-parallel process stopped (its error says why): "
                                "[gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def _close(a, b) -> bool:
    """Equal, floats to 1e-5 relative (sums taken in another order), nested in dicts and lists."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _launcher(tmp_path, preamble: str):
    """A script that runs `preamble` (with os and sys imported), then `diet` with its arguments."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(f"import os, sys\n{preamble}"
                        "from dietprune.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return launcher


def _fast_options() -> dict:
    return {"samples": 4, "tasks": ["arc_easy", "boolq", "rte"]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_paper_config_is_a_valid_sweep(tiny_dir, tmp_path):
    """configs/paper-gemma-2-2b.yaml parses as `diet sweep` options; with the model, tasks and size
    overridden on the command line, its building blocks run on a tiny model."""
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "paper-gemma-2-2b.yaml"
    out = tmp_path / "paper"
    assert main(["--quiet", "sweep", "--config", str(config), "--model", str(tiny_dir), "--out", str(out),
                 "--methods", "diet", "magnitude", "--sparsities", "0.25", "--limit", "2", "--data-source",
                 "offline", "--no-perplexity", *FAST_PROFILE]) == 0
    table = (out / "results.md").read_text()
    assert "## acc\n" in table and "## score (acc_norm where lm-eval reports it, else acc)" in table
    assert table.count("| magnitude | ") == 2 and "avg - diet" in table


def test_a_slow_cpu_dtype_is_one_warning_line(monkeypatch, caplog):
    """bfloat16 on a CPU without native units (40x slower than float32 on an AVX2 EPYC) is one warning
    line with the measured ratio; where it is fast, nothing is said."""
    import dietprune.plan as plan
    from dietprune.device import cpu_matmul_ratio

    measured = cpu_matmul_ratio(torch.bfloat16)
    assert measured > 0 and cpu_matmul_ratio(torch.bfloat16) == measured  # measured once, then cached
    from dietprune.io import cache_root

    (cache_root() / "cpu_speed.json").write_text('{"half a fi')  # two processes' writes crossed
    assert cpu_matmul_ratio(torch.bfloat16) > 0  # measured again, and the cache made whole
    assert len(json.loads((cache_root() / "cpu_speed.json").read_text())) == 1
    monkeypatch.setattr(plan, "cpu_matmul_ratio", lambda dtype: 40.0)
    with caplog.at_level("WARNING"):
        assert plan.compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert plan.compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert [r.getMessage() for r in caplog.records] == [
        "bfloat16 matrix products run 40x slower than float32 on this CPU (no native bfloat16 units); "
        "--dtype float32 (the CPU default) is faster here"]
    caplog.clear()
    monkeypatch.setattr(plan, "cpu_matmul_ratio", lambda dtype: 0.5)
    with caplog.at_level("WARNING"):
        plan.compute_dtype("bfloat16", torch.device("cpu"))
    assert not caplog.records
