"""`diet bench DENSE PRUNED`: measured vs ideal speedup of a pruned model, and memory.

Each model is measured in its own subprocess (so peak RSS is its own): prefill of 512 tokens at batch
1 and 8 (logits at the last position only, as generation does), and greedy decoding of 128 new tokens
at batch 1. One warm-up, then the median of `repeats`. The ideal speedup is the ratio of matmul FLOPs
per token (attention scores included), which hidden-dimension pruning reduces almost uniformly.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from dietprune.errors import DietError
from dietprune.evaluate import dtype_name
from dietprune.models.edit import count_params, head_dim
from dietprune.models.load import resolve
from dietprune.plan import compute_dtype, resolve_device

PROMPT = 512
NEW_TOKENS = 128
SPEEDUP_METRICS = {  # throughput -> the FLOPs per token its ideal speedup is the ratio of
    "prefill_b1_tok_s": "prefill_flops_per_token",
    "prefill_b8_tok_s": "prefill_flops_per_token",
    "decode_b1_tok_s": "decode_flops_per_token",
}


def matmul_flops_per_token(model: nn.Module, context: int, with_head: bool) -> float:
    """2 x (linear-layer parameters) + attention score/value FLOPs at an average context length."""
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    if with_head:
        linear += head.weight.numel()
    config = model.config
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim(config) * context
    return 2 * linear + attention


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` after one warm-up (GPU work waited for before the clock stops)."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


@torch.inference_mode()
def measure(path: str, repeats: int, dtype: str, device: str) -> dict:
    """Throughputs and peak memory of one model (run in a fresh process)."""
    from dietprune.models.load import load_model

    where = resolve_device(device)
    model = load_model(path, compute_dtype(dtype, where), where).model
    vocab = model.config.vocab_size
    ids = {b: torch.randint(10, vocab, (b, PROMPT), generator=torch.Generator().manual_seed(b)).to(where)
           for b in (1, 8)}
    result = {"model": path, "device": str(where), "dtype": dtype_name(model.dtype),
              "hidden_size": model.config.hidden_size,
              "params": count_params(model)}
    for batch, x in ids.items():
        seconds = _median_seconds(lambda x=x: model(x, logits_to_keep=1, use_cache=False), repeats, where)
        result[f"prefill_b{batch}_tok_s"] = batch * PROMPT / seconds
    prompt = ids[1][:, :32]

    def generate() -> None:
        model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                       pad_token_id=0)

    result["decode_b1_tok_s"] = NEW_TOKENS / _median_seconds(generate, repeats, where)
    result["prefill_flops_per_token"] = matmul_flops_per_token(model, PROMPT // 2, with_head=False)
    result["decode_flops_per_token"] = matmul_flops_per_token(model, 32 + NEW_TOKENS // 2, with_head=True)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if where.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(where) / 2**20
    return result


def measure_in_subprocess(path: str, repeats: int, dtype: str, device: str) -> dict:
    """`measure` in a fresh Python process, so that its peak memory is this model's alone."""
    resolve(path)  # a missing or foreign model is refused here, in one line
    resolve_device(device)
    out = subprocess.run([sys.executable, "-m", "dietprune.bench", path, str(repeats), dtype, device],
                         capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise DietError(f"measuring {path} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speedups(dense: dict, pruned: dict) -> dict:
    """Per metric: measured speedup, ideal speedup (FLOP ratio) and their quotient."""
    result = {}
    for metric, flops in SPEEDUP_METRICS.items():
        measured, ideal = pruned[metric] / dense[metric], dense[flops] / pruned[flops]
        result[metric] = {"measured": measured, "ideal": ideal, "ratio": measured / ideal}
    return result


def bench(dense: str, pruned: str, repeats: int, dtype: str, device: str) -> dict:
    """Measure both models in subprocesses; speedups measured, ideal (FLOP ratio) and their quotient."""
    d = measure_in_subprocess(dense, repeats, dtype, device)
    p = measure_in_subprocess(pruned, repeats, dtype, device)
    return {"dense": d, "pruned": p, "speedup": speedups(d, p), "torch_threads": torch.get_num_threads()}


def table(result: dict) -> str:
    """Markdown: throughput of both models, measured and ideal speedup."""
    lines = ["| metric | dense | pruned | speedup | ideal (FLOPs) | measured / ideal |",
             "|---|---:|---:|---:|---:|---:|"]
    for metric, s in result["speedup"].items():
        lines.append(f"| {metric} | {result['dense'][metric]:.1f} | {result['pruned'][metric]:.1f} | "
                     f"{s['measured']:.3f} | {s['ideal']:.3f} | {s['ratio']:.2f} |")
    lines.append(f"| peak RSS (MB) | {result['dense']['peak_rss_mb']:.0f} | "
                 f"{result['pruned']['peak_rss_mb']:.0f} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])))
