"""The device check: one prepared command for a lent GPU machine, each part in its own process with its
own time limit, each part's JSON rewritten in OUT after every step it finishes (a crash or a timeout
loses only what that part had not reached).

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT     # on the GPU machine (under 10 minutes)
    .venv/bin/python benchmarks/gpu_check.py --out DIR --smoke  # here: every part at toy sizes, CPU

It needs only what such a machine has (torch, transformers, accelerate, safetensors; no task data, no
network): models are built from published configs with random weights on the device, calibration text
is generated (a JSONL file of seven "tasks", given as --calibration: the user's-own-data path), and
the tokenizer is the tests' word-level one. Parts:
  equivalence  masked == sliced on the device in float32 and bfloat16, every adapter's tiny model;
  scores       the same tiny model profiled on the device and on the CPU: scores and the 20% mask;
  prune_9b     `dietprune.prune` (the default: profile 7 x 100 samples, vote, slice, full recovery; no
               generic LAMBADA passages, which that machine lacks) of
               a random Gemma-2-9B-shaped model built on the device, then save: seconds per stage,
               peak device memory against the bf16 weights, profiling throughput against a plain
               forward pass over the same batches; the saved checkpoint reloaded by stock transformers;
  serving      `diet bench` of the dense and pruned 9B checkpoints: prefill and generate() on the device;
  engine_70b   Llama-3-70B-width models (d 8192, MLP 28672, 64/8 heads) of 2, 4 and 8 layers written to
               disk, pruned with --weights stream: peak device and host memory against depth with
               --recover none, and the default recovery at 2 and 4 layers (the cost of one layer, so
               the 80-layer prune projected);
  evaluator    our log-likelihood evaluator on the 9B-shaped model: requests per second; float32
               predictions on the device against the CPU's, bfloat16 agreement; lm-eval's HF backend
               on the same requests when lm-eval is importable there.
`--smoke` runs every part at toy sizes on the CPU in seconds (tests/test_gpu_check.py), so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))

LIMITS = {"equivalence": 25, "scores": 25, "prune_9b": 150, "serving": 180, "engine_70b": 200,  # seconds
          "evaluator": 30}
USES_WORK = {"prune_9b", "serving"}  # the parts that write or read the 9B checkpoints in the work folder
SHAPES = {  # the published configs' shapes (google/gemma-2-9b, meta-llama/Llama-3.1-70B), and toy ones
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       query_pre_attn_scalar=256),
    "llama-3-70b-layer": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "toy-gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16),
    "toy-llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, vocab_size=64),
}


def config(name: str, **changes):
    from transformers import AutoConfig

    shape = dict(SHAPES[name]) | changes
    model_type = shape.pop("model_type")
    shape.setdefault("vocab_size", 256000 if model_type == "gemma2" else 64)
    return AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)


def calibration_file(directory: Path, samples: int, words: int) -> Path:
    """Seven tasks of `samples` generated texts each, `words` words long on average (the tokenizer's)."""
    from conftest import tiny_tokenizer

    vocabulary = [w for w in tiny_tokenizer().get_vocab() if not w.startswith("<")]
    rng = random.Random(0)
    path = directory / "calibration.jsonl"
    with path.open("w") as f:
        for task in range(7):
            for _ in range(samples):
                text = " ".join(rng.choices(vocabulary, k=rng.randint(words // 2, 3 * words // 2)))
                f.write(json.dumps({"text": text, "task": f"t{task}"}) + "\n")
    return path


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str, reset: bool = False) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def part_equivalence(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """max |masked - sliced| logits (and over the largest |logit|) per adapter and dtype."""
    import torch
    from conftest import CONFIGS, HIDDEN, VOCAB, tiny_model

    from dietprune.mask import masked
    from dietprune.slice import slice_model

    keep = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:32]
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for model_type in sorted(CONFIGS):
            model = tiny_model(model_type).to(device, dtype)
            with torch.no_grad(), masked(model, keep):
                want = model(ids).logits.float()
            with torch.no_grad():
                got = slice_model(model, keep)(ids).logits.float()
            relative = (got - want).abs().max() / want.abs().max()
            out[f"{model_type}/{str(dtype)[6:]}"] = round(relative.item(), 6)
    yield {"relative_max_difference": out}


def part_scores(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """The same model profiled on the device and on the CPU in float32."""
    import torch
    from conftest import HIDDEN, profile_texts, tiny_model

    from dietprune.merge import merge

    texts = ["Question: is the sky blue ? Answer: yes", "the cat is on the mat .", "a b c d e f g h"] * 8
    out = {}
    for model_type in ("llama", "gemma3_text"):
        scores = {where: profile_texts(tiny_model(model_type).to(where), texts).score("l1").cpu()
                  for where in ("cpu", device)}
        cpu, dev = scores["cpu"], scores[device]
        k = int(0.8 * HIDDEN)
        out[model_type] = {"max_relative_difference": ((cpu - dev).abs() / cpu.abs()).max().item(),
                           "same_mask": torch.equal(merge(cpu[None], k), merge(dev[None], k))}
    yield out


def _save(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _built(name: str, device: str, **changes):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(config(name, **changes), dtype=torch.bfloat16).eval()


def part_prune_9b(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """The default prune of a 9B-shaped model, timed by stage, with peak device memory; the dense and
    pruned checkpoints are left in WORK for `serving`, and the saved one is reloaded by stock
    transformers and compared with the pruned model in memory."""
    import torch
    from conftest import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    import dietprune
    from dietprune.calibration import Batching, token_batches

    name = "toy-gemma2" if smoke else "gemma-2-9b"
    tokenizer = tiny_tokenizer()
    started = time.perf_counter()
    model = _built(name, device)
    synchronize(device)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    yield {"model": name, "weights_gb": round(weights_gb, 2),
           "build_s": round(time.perf_counter() - started, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        texts = calibration_file(Path(tmp), 8 if smoke else 100, 40 if smoke else 150)
        plain = [json.loads(line)["text"] for line in texts.read_text().splitlines()]
        budget = 65536 if device.startswith("cuda") else 4096
        batches = token_batches(tokenizer, plain, Batching(8, 1024, budget))
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        with torch.inference_mode():  # a plain forward pass over the same batches, warmed up
            model.get_decoder()(**{k: v.to(device) for k, v in batches[0].items()}, use_cache=False)
            synchronize(device)
            started = time.perf_counter()
            for batch in batches:
                model.get_decoder()(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            synchronize(device)
            forward_s = time.perf_counter() - started
        yield {"calibration_tokens": tokens, "plain_forward_tokens_per_s": round(tokens / forward_s)}
        started = time.perf_counter()
        _save(model, tokenizer, work / "dense")
        yield {"dense_save_s": round(time.perf_counter() - started, 1)}
        peak_memory(device, reset=True)
        os.environ["DIETPRUNE_CACHE"] = str(Path(tmp) / "cache")
        started = time.perf_counter()
        pruned = dietprune.prune(model, tokenizer, tasks=(), calibration=(str(texts),), samples=100,
                                 device=device, in_place=True, recover_generic=0)  # no LAMBADA there
        synchronize(device)
        prune_s = time.perf_counter() - started
        peak_gb = peak_memory(device)
        stages = pruned.record["seconds_by_stage"]
        yield {"prune_s": round(prune_s, 1), "stages_s": stages, "peak_gb": peak_gb,
               "peak_over_weights": peak_gb and round(peak_gb / weights_gb, 3),
               "profile_tokens_per_s": round(tokens / stages["calibrate"]),
               "kept": pruned.record["hidden_size_after"], "recovery_s": pruned.record["recovery"]["seconds"]}
        started = time.perf_counter()
        dietprune.save(pruned, work / "pruned")
        yield {"save_s": round(time.perf_counter() - started, 1)}
    stock = AutoModelForCausalLM.from_pretrained(work / "pruned", dtype=pruned.model.dtype, device_map=device)
    ids = batches[0]["input_ids"][:4].to(device)
    with torch.inference_mode():
        difference = (stock(ids).logits.float() - pruned.model(ids).logits.float()).abs().max().item()
    yield {"stock_reload_max_abs_logit_difference": difference}


def part_serving(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """`diet bench` of the dense and the pruned checkpoints `prune_9b` saved: prefill and greedy
    decoding through transformers' generate on the device, measured against the FLOP ratio."""
    from dietprune.bench import SPEEDUP_METRICS, bench

    try:
        result = bench(str(work / "dense"), str(work / "pruned"), 1 if smoke else 3, "bfloat16", device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keep = ("hidden_size", "params", *SPEEDUP_METRICS, "peak_gpu_mb")
    yield {name: {k: result[name].get(k) for k in keep} for name in ("dense", "pruned")} | {
        "speedup": result["speedup"]}


def part_engine_70b(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """Streamed prunes of 70B-width models of several depths: peak device and host memory against
    depth with --recover none, and the default (full recovery) at two depths, whose difference is the
    cost of one more layer: from it, the default prune of an 80-layer model projected."""
    import torch
    from conftest import tiny_tokenizer

    import dietprune

    name = "toy-llama" if smoke else "llama-3-70b-layer"
    tokenizer = tiny_tokenizer()
    runs = ((2, "none"), (2, "full"), (4, "none"), (4, "full"), (8, "none"))
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts = calibration_file(Path(tmp), 8 if smoke else 100, 40 if smoke else 150)
        os.environ["DIETPRUNE_CACHE"] = str(Path(tmp) / "cache")
        for layers, recover in runs:
            source, built_s = Path(tmp) / f"m{layers}", None
            if not source.exists():
                started = time.perf_counter()
                _save(_built(name, device, num_hidden_layers=layers), tokenizer, source)  # random weights
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                built_s = round(time.perf_counter() - started, 1)
            peak_memory(device, reset=True)
            started = time.perf_counter()
            pruned = dietprune.prune(str(source), tasks=(), calibration=(str(texts),), samples=100,
                                     device=device, weights="stream", recover=recover, recover_generic=0,
                                     staging=Path(tmp) / "out")
            synchronize(device)
            seconds[layers, recover] = time.perf_counter() - started
            shutil.rmtree(Path(tmp) / "out")
            if (layers, recover) == max(r for r in runs if r[0] == layers):
                shutil.rmtree(source)
            host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            yield {f"layers_{layers}_recover_{recover}": {
                "seconds": round(seconds[layers, recover], 1), "peak_gb": peak_memory(device),
                "host_peak_rss_gb_so_far": round(host_gb, 2),
                "stages_s": pruned.record["seconds_by_stage"], "build_and_write_source_s": built_s,
                "recovery_s": pruned.record.get("recovery", {}).get("seconds")}}
            if (layers, recover) == (4, "full"):  # (2, "full") ran before it
                per_layer = (seconds[4, "full"] - seconds[2, "full"]) / 2
                yield {"full_seconds_per_layer": round(per_layer, 1),
                       "projected_80_layers_full_s": round(seconds[2, "full"] + 78 * per_layer)}


def part_evaluator(device: str, smoke: bool, work: Path) -> Iterator[dict]:
    """Requests per second of our evaluator on a 9B-shaped model; fp32 device vs CPU predictions and
    bf16 agreement on the tiny model; lm-eval's HF backend when it is there."""
    import importlib.util

    import torch
    from conftest import tiny_model, tiny_tokenizer

    from dietprune.engine import loglikelihoods

    tokenizer = tiny_tokenizer()
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    rng = random.Random(1)
    requests = [(" ".join(rng.choices(words, k=rng.randint(20, 120))),
                 " " + " ".join(rng.choices(words, k=3))) for _ in range(40 if smoke else 1000)]
    model = _built("toy-gemma2" if smoke else "gemma-2-9b", device)
    loglikelihoods(model, tokenizer, requests[:8])
    synchronize(device)
    started = time.perf_counter()
    loglikelihoods(model, tokenizer, requests)
    synchronize(device)
    rate = len(requests) / (time.perf_counter() - started)
    del model
    tiny, compared = tiny_model("gemma3_text"), requests[:200]
    cpu = loglikelihoods(tiny, tokenizer, compared)[0]
    dev32 = loglikelihoods(tiny.to(device), tokenizer, compared)[0]
    dev16 = loglikelihoods(tiny.to(device, torch.bfloat16), tokenizer, compared)[0]
    pairs = range(0, len(compared) - 1, 2)  # requests taken two at a time as a two-choice question
    choice = {name: [lls[i] >= lls[i + 1] for i in pairs] for name, lls in
              (("cpu", cpu), ("fp32", dev32), ("bf16", dev16))}

    def same(name: str) -> float:
        return sum(a == b for a, b in zip(choice["cpu"], choice[name], strict=True)) / len(pairs)

    out = {"requests_per_s": round(rate, 1), "requests": len(requests), "fp32_same_choice": same("fp32"),
           "bf16_same_choice": same("bf16"),
           "fp32_max_abs_loglikelihood_difference": max(abs(a - b) for a, b in zip(cpu, dev32, strict=True))}
    out["lm_eval"] = "importable" if importlib.util.find_spec("lm_eval") else "not on this machine"
    yield out


PARTS = {"equivalence": part_equivalence, "scores": part_scores, "prune_9b": part_prune_9b,
         "serving": part_serving, "engine_70b": part_engine_70b, "evaluator": part_evaluator}


def run_part(name: str, out: Path, device: str, smoke: bool, work: Path) -> None:
    import accelerate
    import torch
    import transformers

    started = time.perf_counter()
    result = {"part": name, "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "accelerate": accelerate.__version__}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")  # replaces any earlier run's
    for step in PARTS[name](device, smoke, work):
        result |= step | {"seconds": round(time.perf_counter() - started, 3)}  # toy parts take ~0.05 s
        path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a folder: one JSON per part")
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a test of the script, on a CPU)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # checkpoints passed between parts
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="dietprune-gpu-check-"))
    if args.part:
        run_part(args.part, args.out, device, args.smoke, work)
        return
    try:
        for done, name in enumerate(args.parts, 1):
            run_in_own_process(name, args, device, work)
            if not USES_WORK.intersection(args.parts[done:]):  # a killed part cannot clean up after itself
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in_own_process(name: str, args: argparse.Namespace, device: str, work: Path) -> None:
    """One part in a fresh process (and its own process group, so a timeout also ends what it started);
    a failure's or timeout's status and stderr tail are added to whatever steps the part had written."""
    limit = LIMITS[name] * (3 if args.smoke else 1)
    command = [sys.executable, __file__, "--out", str(args.out), "--device", device, "--part", name,
               "--work", str(work), *(["--smoke"] if args.smoke else [])]
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            status = "ok" if child.wait(timeout=limit) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = f"timed out after {limit} s"
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-25:]
    if status != "ok":
        path = args.out / f"{name}.json"
        done = json.loads(path.read_text()) if path.exists() else {"part": name}
        path.write_text(json.dumps(done | {"status": status, "stderr_tail": tail}, indent=1) + "\n")
    print(f"{name}: {status}", *(["\n  " + "\n  ".join(tail[-8:])] if status != "ok" else []), flush=True)

if __name__ == "__main__":
    main()
