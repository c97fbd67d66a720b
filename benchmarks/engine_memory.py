"""Memory of the sequential engine against depth, at Llama-3-70B width (d 8192, MLP 28672, 64 heads / 8
KV heads, vocabulary 128,256), on this CPU: random-weight models of several depths are written to disk
in bfloat16 (one layer at a time: nothing here holds a whole model), then pruned by `diet prune
--weights stream` in their own process under /usr/bin/time -v (peak RSS), with few calibration samples
(this measures memory and where the time goes, not accuracy); each checkpoint is checked against the
tensors and shapes stock transformers builds from its saved config (on the meta device).

    .venv/bin/python benchmarks/engine_memory.py --layers 2 4 8 --recover none   # flat in depth
    .venv/bin/python benchmarks/engine_memory.py --layers 14 --recover none       # larger than RAM
    .venv/bin/python benchmarks/engine_memory.py --layers 1 --recover full        # the writer system

Results go to benchmarks/results/engine_memory.json (rows of earlier runs are kept), with the terms the
peak should be made of: one block's weights in the compute dtype, the calibration hidden states, the
statistics, and the process's runtime (torch, transformers and dietprune imported, tokenizer loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_tokenizer  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from dietprune.device import machine  # noqa: E402

SHAPE = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
             head_dim=128, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
             max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
OUT = Path("benchmarks/results/engine_memory.json")
BASELINE = """
import sys, torch, transformers
import dietprune.api, dietprune.sequential
transformers.AutoTokenizer.from_pretrained(sys.argv[1])
"""


def write_model(directory: Path, layers: int) -> int:
    """A random Llama of 70B width and `layers` layers, in bf16 shards of one layer each; its bytes."""
    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    config.dtype = "bfloat16"
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    d, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
              "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
              "mlp.gate_proj.weight": (m, d), "mlp.up_proj.weight": (m, d), "mlp.down_proj.weight": (d, m),
              "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    files, weight_map = [], {}

    def shard(tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(tensors, name))

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    for i in range(layers):
        shard({f"model.layers.{i}.{k}": random(s) for k, s in shapes.items()})
    shard({"model.embed_tokens.weight": random((config.vocab_size, d)), "model.norm.weight": random((d,))})
    shard({"lm_head.weight": random((config.vocab_size, d))})
    total = sum((directory / f).stat().st_size for f in files)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return total


def stock_shapes_match(path: Path) -> bool:
    """Whether stock transformers, building the saved config on the meta device, expects exactly the tensors
    and shapes the saved safetensors files hold (no weights are read)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    saved = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            saved |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)
    return saved == expected


def timed(argv: list[str], env: dict) -> tuple[int, float, str]:
    started = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) * 1024
    return peak, time.perf_counter() - started, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--recover", default="none", choices=("none", "full"))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="a folder with room for the models")
    args = parser.parse_args()
    rows = {(r["layers"], r["recover"]): r for r in json.loads(OUT.read_text())} if OUT.is_file() else {}
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        for layers in args.layers:
            source, pruned = work / f"l{layers}", work / f"p{layers}"
            started = time.perf_counter()
            disk = write_model(source, layers)
            written_s = time.perf_counter() - started
            env = os.environ | {"DIETPRUNE_CACHE": str(work / "cache")}
            baseline = timed([sys.executable, "-c", BASELINE, str(source)], env)[0]
            argv = [sys.executable, "-m", "dietprune.cli", "--quiet", "prune", "--model", str(source),
                    "--out", str(pruned), "--weights", "stream", "--recover", args.recover, "--samples",
                    str(args.samples), "--recover-samples", str(args.samples), "--tasks", "arc_easy", "boolq",
                    "--json"]
            peak, wall, _ = timed(argv, env)
            record = json.loads((pruned / "dietprune.json").read_text())
            d, m = SHAPE["hidden_size"], SHAPE["intermediate_size"]
            block = 4 * (2 * d * d + 2 * d * 1024 + 3 * d * m + 2 * d)  # one layer's weights in float32
            tokens = sum(t.get("tokens", 0) for t in record["calibration"].values())
            row = {"layers": layers, "recover": args.recover, "samples": args.samples, "disk_bytes": disk,
                   "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "wall_s": round(wall, 1),
                   "write_s": round(written_s, 1), "stages_s": record["seconds_by_stage"],
                   "terms_bytes": {"one_block_float32": block, "hidden_states": 2 * tokens * d * 4,
                                   "runtime": baseline},
                   "calibration_tokens": tokens, "output_files": len(list(pruned.glob("*.safetensors"))),
                   "stock_transformers_shapes_match": stock_shapes_match(pruned),
                   "machine": machine(), "date": time.strftime("%Y-%m-%d")}
            rows[layers, args.recover] = row
            print(json.dumps(row), flush=True)
            shutil.rmtree(source)
            shutil.rmtree(pruned)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ordered = sorted(rows.values(), key=lambda r: (r["recover"], r["layers"]))
    OUT.write_text(json.dumps(ordered, indent=1) + "\n")


if __name__ == "__main__":
    main()
