"""Profiling at scale: data-parallel processes and offloaded models give the single-process scores."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import profile_texts, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

TEXTS = ["the a is of", "Question: is the a ? Answer: yes", "a", "b c d e f g h i j k l m n",
         "x y z", "the of the of the", "q r s"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = profile_texts(tiny_model("llama"), TEXTS, rows=2)
        save_file({"sum_abs": stats.sum_abs, "sum_sq": stats.sum_sq,
                   "tokens": torch.tensor(stats.tokens)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    single = profile_texts(tiny_model("llama"), TEXTS, rows=2)
    out = str(tmp_path / "stats")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        got = load_file(f"{out}.{rank}")
        assert got["tokens"] == single.tokens
        assert torch.allclose(got["sum_abs"], single.sum_abs, rtol=1e-6)
        assert torch.allclose(got["sum_sq"], single.sum_sq, rtol=1e-6)


def test_offloaded_model_profiles_the_same(tmp_path):
    model = tiny_model("gemma3_text")
    model.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=tmp_path / "offload").eval()
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    expected = profile_texts(model, TEXTS)
    got = profile_texts(offloaded, TEXTS)
    assert got.tokens == expected.tokens
    assert torch.allclose(got.sum_abs, expected.sum_abs, rtol=1e-5)
