"""Placement: where the model runs and in which dtype, decided in one place.

`--device auto` is CUDA when torch sees a GPU (under torchrun, the process's LOCAL_RANK GPU), else the
CPU; `--dtype auto` is bfloat16 on a GPU and float32 on the CPU (where bfloat16 changes ~4% of the
evaluator's predictions: docs/BENCHMARKS.md). `--device-map auto` hands placement to accelerate,
which spreads the layers over every GPU and offloads what does not fit to CPU memory and disk.
Every stage then sends its inputs to `input_device(model)` and lets accelerate's hooks move
activations between devices.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dietprune.errors import DietError
from dietprune.io import cache_root

GIB = 1 << 30


def resolve_device(name: str) -> torch.device:
    """The torch device for `--device`: auto, cpu, cuda or cuda:N."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DietError(f"--device {name}: no CUDA device is available here (torch sees none); "
                            "use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DietError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices here")
        return device
    return torch.device(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the model is loaded and run in: `auto` is bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: where its input embedding computes."""
    return execution_device(model.get_input_embeddings())


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate keeps some of the weights off the devices (CPU or disk offload)."""
    return any(p.device.type == "meta" for p in model.parameters())


def cpu_tensors(model: nn.Module, without: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) of every tensor in the model's state dict, in its order, except those under the
    prefix `without`; modules accelerate offloaded are onloaded one at a time, so memory holds one
    module's weights at most."""
    from accelerate.utils import align_module_device

    for prefix, module in model.named_modules():
        if without and f"{prefix}.".startswith(without):
            continue
        with align_module_device(module, torch.device("cpu")):
            own = [*module.named_parameters(recurse=False), *(
                (name, b) for name, b in module.named_buffers(recurse=False)
                if name not in module._non_persistent_buffers_set)]
            for name, tensor in own:
                yield (f"{prefix}.{name}" if prefix else name), tensor.detach().cpu()


def full_state_dict(model: nn.Module, without: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with real tensors, except those under the prefix `without`: as it is when
    nothing is offloaded, else every tensor in CPU memory (offloaded modules onloaded one at a time)."""
    if is_offloaded(model):
        return dict(cpu_tensors(model, without))
    return {n: t for n, t in model.state_dict().items() if not without or not n.startswith(without)}


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the context, the weights accelerate offloaded from `module` and its submodules are real
    tensors on the device the module computes on (a no-op for a module that is not offloaded)."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for submodule in module.modules():
            stack.enter_context(align_module_device(submodule))
        yield module


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: the execution device of accelerate's hooks on it or its submodules,
    else its weights' device."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return next(p.device for p in module.parameters() if p.device.type != "meta")


def place_like(model: nn.Module, like: nn.Module, device_map: str) -> nn.Module:
    """Dispatch a pruned `model`, built where the dense model's tensors were, as accelerate dispatched
    the dense `like`: with the same map when every module is still there (a hidden-dim slice keeps
    them all: GPU modules are already in place, offloaded ones are CPU tensors that go back to their
    offload), else with a new map of the same kind (`device_map`) for the model's new structure."""
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
    """Where accelerate offloads weights to disk: the cache, one folder per process."""
    return cache_root() / "offload" / str(os.getpid())


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(re.match(r"\s*(\d+)", info["MemAvailable"])[1]) * 1024


def check_fits(name: str, weight_bytes: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before loading, a model whose weights alone do not fit the device's free memory."""
    free = free_memory(device)
    if weight_bytes > free:
        where = f"{device} ({'GPU' if device.type == 'cuda' else 'host'} memory)"
        raise DietError(f"{name} needs {weight_bytes / GIB:.1f} GiB for its weights in "
                        f"{str(dtype).removeprefix('torch.')} and {where} has {free / GIB:.1f} GiB free; use "
                        "--device-map auto to spread it over the GPUs and offload the rest to CPU memory and "
                        "disk, or a smaller --dtype")


@contextlib.contextmanager
def memory_guard(device: str) -> Iterator[None]:
    """Turn running out of memory mid-run into one line with what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise DietError(f"out of memory on {device} ({str(exc).splitlines()[0][:120]}); use a smaller "
                        "--batch-size or --eval-batch-size, --device-map auto, or a smaller --dtype") from exc


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group: NCCL between GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
