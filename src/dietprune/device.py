"""Device mechanics: where a module computes, what fits, accelerate's placement of a pruned model,
out-of-memory messages and the process group of data-parallel runs. (Which device and dtype `auto`
means is decided in plan.py.)"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dietprune.errors import DietError, first_line
from dietprune.io import cache_root, read_json, write_json_atomic

GIB = 1 << 30


def execution_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where a module computes: the execution device of accelerate's hooks on it or its submodules, else
    the device of its real (not meta) weights, else `default`."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    real = [p.device for p in module.parameters() if p.device.type != "meta"]
    return real[0] if real else (default or torch.device("cpu"))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: where its input embedding computes."""
    return execution_device(model.get_input_embeddings())


def place_like(model: nn.Module, like: nn.Module, device_map: str) -> nn.Module:
    """Dispatch a pruned `model`, built where the dense model's tensors were, as accelerate dispatched
    the dense `like`: with the same map when every module is still there (a hidden-dim slice keeps
    them all), else with a new map of the same kind (`device_map`) for the model's new structure.
    Offloaded weights go to a fresh folder of their own (`offload_folder`)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    dispatch_map = like.hf_device_map
    if not set(dispatch_map) <= {name for name, _ in model.named_modules()}:
        model = model.to("cpu")  # a new structure: plan from one place
        no_split = getattr(model, "_no_split_modules", None) or []
        balanced = device_map.startswith("balanced")
        memory = get_balanced_memory(model, no_split_module_classes=no_split) if balanced else None
        dispatch_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, dispatch_map, offload_dir=str(offload_folder()))


def offload_folder() -> Path:
    """A fresh folder for one model's disk offload, removed when the process ends: accelerate reuses an
    existing offload index, so two dispatches must never share a folder."""
    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def machine() -> dict:
    """What a measurement ran on: the CPU's model, its ISA level (the widest vector extension and whether
    it has native bf16), cores and torch's threads (and the ISA torch was told to use), and the GPU."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", info))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return {"cpu": model[1] if model else "unknown", "isa": isa,
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_isa": os.environ.get("ATEN_CPU_CAPABILITY") or "default",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def cpu_matmul_ratio(dtype: torch.dtype) -> float:
    """How many times slower a matrix product runs in `dtype` than in float32 on this CPU: measured once
    (about 0.1 s) and cached per CPU, torch version and ISA setting. Without native bf16 units (AVX-512
    BF16, AMX) torch emulates bfloat16: 40x slower was measured on a 2-core AVX2 EPYC. Each dtype's time is
    the fastest of three trials, so a busy core does not decide it."""
    key = "|".join([machine()["cpu"], torch.__version__, str(dtype), str(torch.get_num_threads()),
                    os.environ.get("ATEN_CPU_CAPABILITY", ""), os.environ.get("ONEDNN_MAX_CPU_ISA", "")])
    cache = cache_root() / "cpu_speed.json"
    try:
        known = read_json(cache, "speed cache") if cache.is_file() else {}
    except DietError:  # damaged: measured again, and rewritten whole
        known = {}
    if key not in known:
        seconds = {}
        for each in (torch.float32, dtype):
            a = torch.randn(256, 256).to(each)
            a @ a  # warm-up
            trials = []
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(4):
                    a @ a
                trials.append(time.perf_counter() - started)
            seconds[each] = min(trials)
        known[key] = seconds[dtype] / seconds[torch.float32]
        with contextlib.suppress(OSError, DietError):  # a cache that cannot be written: measured next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, known)  # processes started together (torchrun) never read half a file
    return known[key]


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def check_fits(name: str, weight_bytes: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before loading, a model whose weights alone do not fit the device's free memory."""
    free = free_memory(device)
    if weight_bytes > free:
        where = f"{device} ({'GPU' if device.type == 'cuda' else 'host'} memory)"
        raise DietError(f"{name} needs {weight_bytes / GIB:.1f} GiB for its weights in "
                        f"{str(dtype).removeprefix('torch.')} and {where} has {free / GIB:.1f} GiB free; "
                        "prune it with --weights stream (one block at a time from its files), evaluate it "
                        "with --device-map auto (spread over the GPUs, the rest offloaded), or use a "
                        "smaller --dtype")


@contextlib.contextmanager
def memory_guard(device: str) -> Iterator[None]:
    """Turn running out of memory mid-run into one line with what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise DietError(f"out of memory on {device} ({first_line(exc)[:120]}); use a smaller "
                        "--batch-size or --eval-batch-size, --weights stream, --device-map auto, or a "
                        "smaller --dtype") from exc


def init_distributed(device: torch.device, device_map: str | None) -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group: NCCL when this process computes on a
    GPU (its LOCAL_RANK GPU), gloo on CPUs. Several processes on one GPU, or a device map over all of
    them in each process, are refused; the group is left when the process ends."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_map is not None:
        raise DietError("--device-map spreads one model over every GPU; under torchrun each process "
                        "takes its own GPU: drop --device-map")
    if device.type == "cuda" and device.index != local:
        raise DietError(f"under torchrun process {local} computes on cuda:{local}, not {device}; use "
                        "--device auto or cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_leave_group)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
