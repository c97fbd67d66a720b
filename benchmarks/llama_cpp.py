"""llama.cpp, built from the llama-cpp-python 0.3.36 source distribution (a registry package: its vendored
llama.cpp, converter included), for `make test-serving` and the serving benchmark.

    .venv/bin/python benchmarks/llama_cpp.py      # dense vs pruned: max |delta logit|, argmax, tokens/s

build() downloads the sdist once and builds libllama with cmake under .cache/llama.cpp (about 10 min
on 2 cores, then cached). A checkpoint goes through llama.cpp's own convert_hf_to_gguf.py, then runs
through llama-cpp-python's ctypes bindings over that library; the numbers are compared with
transformers on the same tokens. Writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "llama.cpp"
VERSION = "0.3.36"
SOURCE = CACHE / f"llama_cpp_python-{VERSION}"
VENDOR = SOURCE / "vendor" / "llama.cpp"
LIBRARY = CACHE / "build" / "bin"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Question: is the sky blue?\nAnswer:"]


def build() -> None:
    """The sdist, unpacked, and libllama built (CPU, Release); each step skipped when already done."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not VENDOR.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    if not (LIBRARY / "libllama.so").is_file():
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF"]
        subprocess.run(["cmake", "-S", str(VENDOR), "-B", str(CACHE / "build"), *flags], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(CACHE / "build"), "--target", "llama", "-j",
                        str(os.cpu_count())], check=True, stdout=subprocess.DEVNULL)


def convert(checkpoint: Path, outtype: str = "f32") -> Path:
    """llama.cpp's converter on a Hugging Face checkpoint directory."""
    out = checkpoint.with_name(f"{checkpoint.name}.{outtype}.gguf")
    env = os.environ | {"PYTHONPATH": str(VENDOR / "gguf-py")}
    run = subprocess.run([sys.executable, str(VENDOR / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype",
                          outtype, "--outfile", str(out)], capture_output=True, text=True, env=env)
    if run.returncode:
        last = run.stderr.strip().splitlines()[-1]
        raise RuntimeError(f"convert_hf_to_gguf failed on {checkpoint}: {last}")
    return out


LLAMA_RUN = """
import json, sys, time
import numpy as np
import llama_cpp
path, tokens, generate = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
out = {"logits": []}
for ids in tokens:
    llm.reset()
    llm.eval(ids)
    out["logits"].append(np.asarray(llm.scores[len(ids) - 1]).tolist())
if generate:  # a prompt of about 256 tokens, then `generate` greedy tokens; one warm-up, median of 5
    prompt = (tokens[0] * 256)[:256]
    prefill, decode = [], []
    for _ in range(6):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(generate):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decode.append(generate / (time.perf_counter() - started))
    out["prompt_tokens_per_s"] = float(np.median(prefill[1:]))
    out["generate_tokens_per_s"] = float(np.median(decode[1:]))
print(json.dumps(out))
"""


def run_llama_cpp(gguf: Path, tokens: list[list[int]], generate: int = 0) -> dict:
    """Next-token logits after each prompt (and, with `generate`, tokens per second), in a subprocess
    that loads our libllama through llama-cpp-python's bindings."""
    env = os.environ | {"LLAMA_CPP_LIB_PATH": str(LIBRARY), "PYTHONPATH": str(SOURCE)}
    run = subprocess.run([sys.executable, "-c", LLAMA_RUN, str(gguf), json.dumps(tokens), str(generate)],
                         capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"llama.cpp cannot run {gguf.name}: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def transformers_logits(checkpoint: Path, tokens: list[list[int]]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1] for ids in tokens]


def compare(checkpoint: Path, tokens: list[list[int]] | None = None) -> dict:
    """transformers vs llama.cpp (f32) on PROMPTS (or the given token ids): max |delta logit|, whether
    every argmax agrees."""
    import torch
    from transformers import AutoTokenizer

    if tokens is None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokens = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    want = transformers_logits(checkpoint, tokens)
    got = run_llama_cpp(convert(checkpoint), tokens)
    deltas = [(torch.tensor(g) - w).abs().max().item() for g, w in zip(got["logits"], want, strict=True)]
    agree = all(int(torch.tensor(g).argmax()) == int(w.argmax()) for g, w in zip(got["logits"], want,
                                                                               strict=True))
    return {"max_abs_delta_logit": max(deltas), "logit_scale": max(w.abs().max().item() for w in want),
            "argmax_agrees": agree}


def speed(checkpoint: Path, generate: int = 64) -> dict:
    """llama.cpp tokens per second of an F16 conversion (2 threads, the same 256-token prompt for every
    model, one warm-up, median of 5)."""
    from transformers import AutoTokenizer

    tokens = [AutoTokenizer.from_pretrained(checkpoint)(PROMPTS[0])["input_ids"]]
    result = run_llama_cpp(convert(checkpoint, "f16"), tokens, generate)
    return {k: round(v, 1) for k, v in result.items() if k.endswith("per_s")}


def main() -> None:
    from dietprune import api

    build()
    work = CACHE / "bench"
    rows = {}
    for name in ("gemma-3-270m", "smollm2-135m"):
        dense = api.load(name)
        dense.model.save_pretrained(work / f"{name}-dense")
        dense.tokenizer.save_pretrained(work / f"{name}-dense")
        pruned = api.prune(dense, sparsity=0.2, samples=16)
        api.save(pruned, work / f"{name}-pruned", overwrite=True)
        for kind in ("dense", "pruned"):
            checkpoint = work / f"{name}-{kind}"
            started = time.perf_counter()
            rows[f"{name} {kind}"] = compare(checkpoint) | speed(checkpoint) | {
                "seconds": round(time.perf_counter() - started)}
            print(json.dumps({f"{name} {kind}": rows[f"{name} {kind}"]}), flush=True)
    out = ROOT / "benchmarks" / "results" / "serving.json"
    out.write_text(json.dumps({"llama_cpp_python": VERSION, "threads": 2, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
