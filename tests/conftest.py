"""Tiny random-initialised models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 64
HIDDEN = 48
CONFIGS = {
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}


def tiny_config(model_type: str, **overrides):
    """Three layers, 4 heads of 8 dims over a hidden width of 48, with sliding windows where the
    architecture has them; weights large enough that RMSNorm epsilons are negligible."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=model_type.startswith("gemma"))
    if model_type in ("gemma2", "gemma3_text"):
        kwargs |= dict(sliding_window=4, query_pre_attn_scalar=8,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if model_type == "qwen2":
        kwargs |= dict(use_sliding_window=False)
    return getattr(transformers, CONFIGS[model_type])(**(kwargs | overrides))


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random model whose norm gains are random too, so compensation errors cannot hide."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small alphabet of words, adding <bos> like Gemma's."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["Question:", "Answer:", "yes", "no", "True", "False", "the", "a", "is", "of", "?", ".", ","]
    vocab = {w: i for i, w in enumerate(words[:VOCAB])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.add_bos_token = True
    return tok


FAST_PROFILE = ["--samples", "4", "--tasks", "arc_easy", "boolq", "rte"]


def batching(rows: int = 8):
    """Calibration batches as the plan makes them on a CPU, `rows` texts at most."""
    from dietprune.calibration import Batching

    return Batching(rows, 1024, 4096)


def profile_texts(model, texts, site: str = "block_output", rows: int = 8):
    """DIET's statistics of `texts` on a model in memory, through the sequential engine."""
    from dietprune.calibration import Corpus
    from dietprune.profile import profile
    from dietprune.sequential import Weights

    corpus = Corpus("texts", tuple(map(str, range(len(texts)))), tuple(texts))
    return profile(Weights.of(model), tiny_tokenizer(), [corpus], (site,), batching(rows))[site][0]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Gemma-3 checkpoint with a tokenizer, saved like any HF model directory."""
    path = tmp_path_factory.mktemp("models") / "tiny-gemma3"
    tiny_model("gemma3_text").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh dietprune cache (scores, converted models) per test."""
    monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=sorted(CONFIGS))
def model_type(request) -> str:
    return request.param


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, without gradients."""
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


STOCK_LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(name).eval()
    with torch.no_grad():
        out[name] = model(ids).logits.tolist()
assert not any(m.startswith("dietprune") for m in sys.modules)
print(json.dumps(out))
"""


def stock_logits(directories: list, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each saved checkpoint, loaded by stock transformers in a process that never imports
    dietprune (one thread: tiny matrices)."""
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", STOCK_LOGITS, json.dumps(input_ids.tolist()),
                          *map(str, directories)], capture_output=True, text=True, check=True,
                         cwd=str(Path(directories[0]).parent), env=os.environ | {"OMP_NUM_THREADS": "1"})
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: torch.tensor(value) for name, value in loaded.items()}


def recovered(model, texts, keep, parts, in_place: bool = False, alpha: float = 0.01, rows: int = 8,
              channels: int | None = None, grid: tuple[float, ...] = (), head: str = "gains"):
    """The slice of a model in memory to `keep` (and `channels` MLP channels) with `parts` refit on
    `texts` (recover.py), the readers' and writers' dampings from `grid` if given, the head by `head`."""
    from dietprune.assemble import MemorySink
    from dietprune.calibration import Corpus
    from dietprune.models.edit import edited_config
    from dietprune.recover import Refit, recover
    from dietprune.sequential import Weights

    weights = Weights.of(model)
    changes = {"hidden_size": len(keep)} | ({"intermediate_size": channels} if channels else {})
    sink = MemorySink(edited_config(model.config, changes), weights.dtype, in_place)
    corpus = Corpus("texts", tuple(map(str, range(len(texts)))), tuple(texts))
    refit = Refit(parts, alpha, grid, channels, head)
    recover(weights, tiny_tokenizer(), [corpus], keep, refit, batching(rows), sink, in_place)
    return sink.finish()
