"""llama.cpp, built from the llama-cpp-python 0.3.36 source distribution (a registry package: its vendored
llama.cpp, converter and tools included), for `make test-serving` and the serving benchmark.

    .venv/bin/python benchmarks/llama_cpp.py   # dense vs pruned, F16 / Q8_0 / Q4_K_M: size, speed, ppl
    .venv/bin/python benchmarks/llama_cpp.py --only speed   # time the files; add to the last run's rows

build() downloads the sdist once and builds libllama, llama-quantize, llama-perplexity and llama-bench
with cmake under .cache/llama.cpp (about 10 min on 2 cores, then cached). A checkpoint goes through
llama.cpp's own convert_hf_to_gguf.py (then llama-quantize from F16); logits come from llama-cpp-python's
ctypes bindings over that library and are compared with transformers on the same tokens. Speed is
llama-bench's (a 256-token prompt, 64 generated tokens, 2 threads; dense and pruned alternately, each run
one warm-up, the median of 5 runs), perplexity llama-perplexity's on the held-out LAMBADA passages.
Writes benchmarks/results/serving.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
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
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench")
QUANTS = ("Q8_0", "Q4_K_M")
MODELS = ("gemma-3-270m", "smollm2-135m")
THREADS = 2
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Question: is the sky blue?\nAnswer:"]
# CPU, Release, portable: GGML_NATIVE=OFF builds ggml's AVX/AVX2/FMA/F16C/BMI2 kernels, which run on any
# x86-64 machine of the last decade. A native build on an AMX CPU compiles AMX tile kernels that die with
# SIGILL (tileloadd) where the kernel or VM does not grant AMX state, as on the Intel Xeon VM here; and
# hand-picked AVX-512 options fail to compile with gcc 12 (AVX512_BF16's sgemm path). The flags are
# stamped in the build; other flags get a clean build (cmake keeps options in its cache).
BUILD_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_COMMON=ON"]
# llama-quantize's line for a tensor whose rows its type cannot take (llama-quant.cpp, tensor_type_fallback)
FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+\d+ \(required for type\s+(\w+)\)"
                      r".*?-> falling back to\s+(\w+)")


def build() -> None:
    """The sdist, unpacked, and libllama and TOOLS built (CPU, Release); each step skipped when done."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not VENDOR.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    stamp = CACHE / "build" / "dietprune-flags.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != BUILD_FLAGS:
        shutil.rmtree(CACHE / "build", ignore_errors=True)
    if not all((LIBRARY / name).is_file() for name in ("libllama.so", *TOOLS)):
        subprocess.run(["cmake", "-S", str(VENDOR), "-B", str(CACHE / "build"), *BUILD_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(CACHE / "build"), "--target", "llama", *TOOLS, "-j",
                        str(os.cpu_count())], check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(json.dumps(BUILD_FLAGS))


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


def quantize(gguf: Path, qtype: str) -> tuple[Path, list[dict]]:
    """llama-quantize `gguf` (F16) to `qtype`, and the tensors it had to give another type: name, row width
    (ncols), the type wanted and the type given (f16 where the row is not even a multiple of 32)."""
    out = gguf.with_name(gguf.name.replace(".f16.gguf", f".{qtype}.gguf"))
    run = subprocess.run([str(LIBRARY / "llama-quantize"), str(gguf), str(out), qtype, str(THREADS)],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"llama-quantize {qtype} failed on {gguf.name}: {run.stderr.strip()[-300:]}")
    fallbacks = [{"tensor": m[1], "ncols": int(m[2]), "wanted": m[3], "got": m[4]}
                 for m in FALLBACK.finditer(run.stdout + run.stderr)]
    return out, fallbacks


LLAMA_RUN = """
import json, sys
import numpy as np
import llama_cpp
path, tokens = sys.argv[1], json.loads(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
out = {"logits": []}
for ids in tokens:
    llm.reset()
    llm.eval(ids)
    out["logits"].append(np.asarray(llm.scores[len(ids) - 1]).tolist())
print(json.dumps(out))
"""


def run_llama_cpp(gguf: Path, tokens: list[list[int]]) -> dict:
    """Next-token logits after each prompt, in a subprocess that loads our libllama through
    llama-cpp-python's bindings."""
    env = os.environ | {"LLAMA_CPP_LIB_PATH": str(LIBRARY), "PYTHONPATH": str(SOURCE)}
    run = subprocess.run([sys.executable, "-c", LLAMA_RUN, str(gguf), json.dumps(tokens)],
                         capture_output=True, text=True, env=env)
    if run.returncode < 0:  # killed by a signal: its last log line is not the cause
        raise RuntimeError(f"llama.cpp crashed running {gguf.name} ({signal.Signals(-run.returncode).name})")
    if run.returncode:
        raise RuntimeError(f"llama.cpp cannot run {gguf.name}: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def transformers_logits(checkpoint: Path, tokens: list[list[int]]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1] for ids in tokens]


def compare(checkpoint: Path, tokens: list[list[int]] | None = None, gguf: Path | None = None) -> dict:
    """transformers (fp32) vs llama.cpp on PROMPTS (or the given token ids), running `gguf` (default: an F32
    conversion): max |delta logit|, whether every argmax agrees, whether llama.cpp's top 5 always hold
    transformers' argmax."""
    import torch
    from transformers import AutoTokenizer

    if tokens is None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        tokens = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    want = transformers_logits(checkpoint, tokens)
    got = [torch.tensor(g) for g in run_llama_cpp(gguf or convert(checkpoint), tokens)["logits"]]
    pairs = list(zip(got, want, strict=True))
    return {"max_abs_delta_logit": max((g - w).abs().max().item() for g, w in pairs),
            "logit_scale": max(w.abs().max().item() for w in want),
            "argmax_agrees": all(int(g.argmax()) == int(w.argmax()) for g, w in pairs),
            "top5_holds_argmax": all(int(w.argmax()) in g.topk(5).indices.tolist() for g, w in pairs)}


def speed(dense: Path, pruned: Path, repeats: int = 5) -> tuple[dict, dict]:
    """llama-bench tokens per second of a 256-token prompt and of 64 generated tokens (2 threads) for two
    models, run alternately so that whatever else the machine does falls on both: `repeats` runs each,
    every run one warm-up and one timed repetition; the medians."""
    samples: dict[Path, list[dict]] = {dense: [], pruned: []}
    flags = ["-p", "256", "-n", "64", "-r", "1", "-t", str(THREADS), "-o", "json"]
    for _ in range(repeats):
        for gguf in samples:
            run = subprocess.run([str(LIBRARY / "llama-bench"), "-m", str(gguf), *flags], capture_output=True,
                                 text=True, check=True)
            samples[gguf].append({("prompt" if t["n_prompt"] else "generate"): t["avg_ts"]
                                  for t in json.loads(run.stdout)})
    return tuple({f"{kind}_tokens_per_s": round(statistics.median(s[kind] for s in samples[gguf]), 1)
                  for kind in ("prompt", "generate")} for gguf in (dense, pruned))


def perplexity(gguf: Path, text: Path) -> dict:
    """llama-perplexity over `text`: chunks of 512 tokens, each scoring its last 256 (llama.cpp's method)."""
    run = subprocess.run([str(LIBRARY / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512",
                          "-b", "512", "-t", str(THREADS)], capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    estimate = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    return {"perplexity": float(estimate[1]), "perplexity_se": float(estimate[2]),
            "chunks": int(re.search(r"perplexity over (\d+) chunks", log)[1])}


def cpu() -> dict:
    """The CPU the numbers come from: its name, the AVX-512/AMX extensions lscpu reports, its cores."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {"model": re.search(r"Model name:\s+(.+)", lscpu)[1].strip(), "cores": os.cpu_count(),
            "isa": sorted(set(re.findall(r"avx512[a-z_0-9]*|amx[a-z_0-9]*", lscpu)))}


def measure(checkpoint: Path, text: Path) -> dict:
    """One checkpoint: F32 logits against transformers; at F16, Q8_0 and Q4_K_M the file size and perplexity;
    quantised, also the fallbacks and the predictions against transformers."""
    f16 = convert(checkpoint, "f16")
    row = {"logits_f32": compare(checkpoint), "F16": {"bytes": f16.stat().st_size} | perplexity(f16, text)}
    for qtype in QUANTS:
        gguf, fallbacks = quantize(f16, qtype)
        row[qtype] = {"bytes": gguf.stat().st_size, "fallbacks": len(fallbacks),
                      "f16_fallbacks": sum(f["got"] == "f16" for f in fallbacks),
                      "fallback_widths": sorted({f["ncols"] for f in fallbacks})} \
            | perplexity(gguf, text) | {"logits": compare(checkpoint, gguf=gguf)}
    return row


def gguf_file(checkpoint: Path, qtype: str) -> Path:
    """Where convert (F16) and quantize (Q8_0, Q4_K_M) leave a checkpoint's GGUF."""
    return checkpoint.with_name(f"{checkpoint.name}.{'f16' if qtype == 'F16' else qtype}.gguf")


def checkpoints(work: Path) -> dict:
    """Each embedded model saved dense and pruned by 20% (default width and recovery, 16 samples a task)
    under `work`; their widths."""
    from dietprune import api

    widths = {}
    for name in MODELS:
        dense = api.load(name)
        dense.model.save_pretrained(work / f"{name}-dense")
        dense.tokenizer.save_pretrained(work / f"{name}-dense")
        pruned = api.prune(dense, sparsity=0.2, samples=16)
        api.save(pruned, work / f"{name}-pruned", overwrite=True)
        widths |= {f"{name} dense": dense.model.config.hidden_size, f"{name} pruned": pruned.record["width"]}
    return widths


def quality(work: Path) -> dict:
    """checkpoints(), then measure()'s rows."""
    from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages

    text = work / "lambada-heldout.txt"
    text.write_text("\n\n".join(t for _, t in lambada_passages()[-PERPLEXITY_PASSAGES:]) + "\n")
    rows = {}
    for key, width in checkpoints(work).items():
        rows[key] = {"width": width} | measure(work / key.replace(" ", "-"), text)
        print(json.dumps({key: rows[key]}), flush=True)
    return {"llama_cpp_python": VERSION, "perplexity_text": f"the last {PERPLEXITY_PASSAGES} LAMBADA test "
            "passages, joined by blank lines", "rows": rows}


def speed_files(work: Path) -> None:
    """The F16, Q8_0 and Q4_K_M files speed() times, made where missing (no perplexity, no logits)."""
    if not all((work / f"{name}-{kind}").is_dir() for name in MODELS for kind in ("dense", "pruned")):
        checkpoints(work)
    for name, kind in itertools.product(MODELS, ("dense", "pruned")):
        checkpoint = work / f"{name}-{kind}"
        f16 = gguf_file(checkpoint, "F16")
        if not f16.is_file():
            convert(checkpoint, "f16")
        for qtype in QUANTS:
            if not gguf_file(checkpoint, qtype).is_file():
                quantize(f16, qtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("quality", "speed"),
                        help="quality: prune, convert, quantise, compare, perplexity; speed: time the files "
                             "(made where missing, without the slow perplexity and logits) and add the "
                             "times to the last quality run's rows")
    args = parser.parse_args()
    build()
    work = CACHE / "bench"
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "benchmarks" / "results" / "serving.json"
    report = quality(work) if args.only != "speed" else json.loads(out.read_text())
    if args.only == "speed":
        speed_files(work)
    if args.only != "quality":  # the timed part last, dense and pruned alternately
        for name, qtype in itertools.product(MODELS, ("F16", *QUANTS)):
            files = [gguf_file(work / f"{name}-{kind}", qtype) for kind in ("dense", "pruned")]
            for kind, result in zip(("dense", "pruned"), speed(*files), strict=True):
                report["rows"][f"{name} {kind}"][qtype] |= result
        report |= {"threads": THREADS, "cpu": cpu(), "build_flags": BUILD_FLAGS,
                   "speed_date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["rows"]))


def table(rows: dict) -> str:
    """Per model and type: size (and its ratio to dense), fallbacks, tokens per second, perplexity."""
    lines = ["| model | type | MB | / dense | fallbacks (to F16) | prompt tok/s | generate tok/s | ppl |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in rows.items():
        dense = rows[key.replace("pruned", "dense")]
        width = row["width"]["kept"] if isinstance(row["width"], dict) else row["width"]
        for qtype in ("F16", *QUANTS):
            cell = row[qtype]
            fallbacks = f"{cell['fallbacks']} ({cell['f16_fallbacks']})" if "fallbacks" in cell else "–"
            speeds = " | ".join(str(cell.get(f"{kind}_tokens_per_s", "–")) for kind in ("prompt", "generate"))
            lines.append(f"| {key} (K {width}) | {qtype} | {cell['bytes'] / 1e6:.1f} | "
                         f"{cell['bytes'] / dense[qtype]['bytes']:.2f} | {fallbacks} | {speeds} | "
                         f"{cell['perplexity']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
