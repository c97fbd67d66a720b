"""Accelerator check (issue 14): run on a GPU machine; writes benchmarks/results/gpu_check.json.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--skip-lm-eval]

1. masked == sliced on the device, fp32 and bf16, for every adapter's tiny model (max |delta logit|);
2. the same tiny model profiled on the device and on the CPU (fp32): max relative score difference,
   and whether the 20% masks are identical;
3. profile / prune / evaluate timings on random-weight models built on the device from Gemma-2 2B- and
   9B-shaped configs (no weights travel; the word-level test tokenizer feeds them), bf16;
4. our evaluator vs lm-evaluation-harness's HF backend on the same device and examples (the tiny model,
   which has the test tokenizer; a real model needs weights the machine cannot fetch).
Without CUDA it says so and runs part 2 on the CPU against itself (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import CONFIGS, HIDDEN, VOCAB, tiny_model, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config  # noqa: E402

from dietprune import api  # noqa: E402
from dietprune.mask import masked  # noqa: E402
from dietprune.merge import merge  # noqa: E402
from dietprune.profile import profile  # noqa: E402
from dietprune.slice import slice_model  # noqa: E402

TEXTS = ["Question: is the sky blue ? Answer: yes", "the cat is on the mat .", "a b c d e f g h"] * 8
SHAPES = {  # the published configs' shapes (google/gemma-2-2b, google/gemma-2-9b)
    "gemma-2-2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4),
    "gemma-2-9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8),
}
COMMON = dict(head_dim=256, query_pre_attn_scalar=256)  # both


@torch.inference_mode()
def masked_vs_sliced(device: str, dtype: torch.dtype) -> dict[str, float]:
    keep = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:32]
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for model_type in sorted(CONFIGS):
        model = tiny_model(model_type).to(device, dtype)
        with masked(model, keep):
            want = model(ids).logits.float()
        out[model_type] = (slice_model(model, keep)(ids).logits.float() - want).abs().max().item()
    return out


def scores_agree(device: str) -> dict:
    tokenizer = tiny_tokenizer()
    scores = {}
    for where in ("cpu", device):
        model = tiny_model("llama").to(where)
        scores[where] = profile(model, tokenizer, TEXTS).score("l1")
    cpu, dev = scores["cpu"].cpu(), scores[device].cpu()
    k = int(0.8 * HIDDEN)
    same_mask = set(merge(cpu[None], k, "vote").tolist()) == set(merge(dev[None], k, "vote").tolist())
    return {"max_relative_difference": ((cpu - dev).abs() / cpu.abs()).max().item(), "same_mask": same_mask}


def timings(device: str) -> dict:
    tokenizer = tiny_tokenizer()
    out = {}
    for name, shape in SHAPES.items():
        config = Gemma2Config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              **shape, **COMMON)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        torch.cuda.synchronize() if device.startswith("cuda") else None
        started = time.perf_counter()
        profile(model, tokenizer, TEXTS * 4)
        profiled = time.perf_counter() - started
        started = time.perf_counter()
        pruned = api.prune(model, tokenizer, sparsity=0.2, samples=4, tasks=("rte",), device=device)
        pruned_s = time.perf_counter() - started
        started = time.perf_counter()
        api.evaluate(pruned, limit=20, tasks=("rte",), heldout=(), perplexity=False, device=device)
        out[name] = {"profile_96_texts_s": round(profiled, 2), "prune_s": round(pruned_s, 2),
                     "eval_20_rte_s": round(time.perf_counter() - started, 2),
                     "max_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1)
                     if device.startswith("cuda") else None}
        del model, pruned
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-lm-eval", action="store_true")
    args = parser.parse_args()
    result: dict = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        result["device"] = "none: no CUDA here; only the CPU smoke test ran"
        result["scores_cpu_vs_cpu"] = scores_agree("cpu")
    else:
        result["device"] = torch.cuda.get_device_name(0)
        result["masked_vs_sliced"] = {str(dtype): masked_vs_sliced(args.device, dtype)
                                      for dtype in (torch.float32, torch.bfloat16)}
        result["scores_cpu_vs_gpu"] = scores_agree(args.device)
        result["timings"] = timings(args.device)
        if not args.skip_lm_eval:
            model, tokenizer = tiny_model("llama").to(args.device), tiny_tokenizer()
            ours = api.evaluate(model, tokenizer, limit=50, tasks=("rte", "boolq"), heldout=(),
                                perplexity=False, device=args.device)
            theirs = api.evaluate(model, tokenizer, limit=50, tasks=("rte", "boolq"), heldout=(),
                                  perplexity=False, backend="lm-eval", device=args.device)
            result["lm_eval_agreement"] = {
                task: sum(a == b for a, b in zip(ours["tasks"][task]["preds"], theirs["tasks"][task]["preds"],
                                                 strict=True)) for task in ("rte", "boolq")}
    out = Path("benchmarks/results/gpu_check.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
