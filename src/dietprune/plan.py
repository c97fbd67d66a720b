"""The plan of a prune: every option resolved once, before any weight is read, and read by every stage.

Each `auto` has one rule, here:
  recover   full after a hidden-dim method, none after a structural one (docs/RESULTS.md);
  site      block_output for a plain slice (the paper's), norm_output when a refit follows (RESULTS.md);
            a score file's own site when the scores are given;
  device    CUDA when torch sees a GPU (under torchrun, the process's LOCAL_RANK GPU), else the CPU;
            a model already in memory computes where it is;
  dtype     bfloat16 on a GPU, float32 on a CPU (exact and the same on every CPU; bfloat16 is fast only
            on CPUs with native bf16 units, and changes ~4% of the evaluator's predictions);
  save      the narrower of the dtype the source stores and the compute dtype: the checkpoint holds
            what was computed, in no more bytes than that (a GPU run of a float32 Gemma-2 saves bf16);
  weights   load the whole model onto the device when its weights take at most 80% of the device's
            free memory, else stream it from its checkpoint files one block at a time;
  recover_generic  as many LAMBADA passages in the recovery set as it holds task samples (RESULTS.md,
            sixth round: with 64 samples a task and damping 0.1, +2.1 +- 0.8 on the 7 tasks at 20%);
  round_to  merge.kept_width_step (K for llama.cpp's k-quants and vLLM's Marlin where within 2.5 points);
  batching  at most 4,096 padded tokens per calibration batch on a CPU, more on a GPU (by its memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from dietprune.calibration import Batching, Corpus, generic_corpus
from dietprune.device import cpu_matmul_ratio, free_memory
from dietprune.errors import DietError
from dietprune.merge import kept_width, kept_width_step
from dietprune.methods import Method, get_method
from dietprune.models.adapters import adapter_for
from dietprune.recover import PARTS, Refit
from dietprune.settings import CalibrationSettings, PruneSettings, RuntimeSettings

log = logging.getLogger(__name__)
CPU_BATCH_TOKENS = 4096
SLOW = 1.5  # a 16-bit dtype this many times slower than float32 on the CPU is warned about
FIT_FRACTION = 0.8  # `weights auto` loads a model whose weights take at most this share of free memory


def resolve_device(name: str) -> torch.device:
    """The torch device for `--device`: auto, cpu, cuda or cuda:N. auto means this process's GPU (under
    torchrun its LOCAL_RANK one, else the first); so does cuda under torchrun (outside it, torch's
    current GPU)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DietError(f"--device {name}: no CUDA device is available here (torch sees none); "
                            "use --device cpu or auto")
        device = torch.device(name)
        if device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DietError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices here")
        return device
    return torch.device(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the model is loaded and run in (`auto`: see the module doc). A 16-bit dtype asked for on a
    CPU that runs it slowly (no native units) gets one warning line with the measured ratio."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype != torch.float32 and (ratio := cpu_matmul_ratio(dtype)) > SLOW:
        log.warning("%s matrix products run %.0fx slower than float32 on this CPU (no native %s units); "
                    "--dtype float32 (the CPU default) is faster here", name, ratio, name)
    return dtype


def save_dtype(name: str, stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype a pruned checkpoint is saved in (`auto`: see the module doc)."""
    if name != "auto":
        return getattr(torch, name)
    return min((stored, compute), key=lambda dtype: dtype.itemsize)


def resolve_recover(method: Method, recover: str) -> str:
    if recover == "auto":
        return "full" if method.kind == "hidden" else "none"
    return recover


def resolve_site(site: str, recover: str) -> str:
    if site == "auto":
        return "block_output" if recover == "none" else "norm_output"
    return site


def recovery_set(settings: PruneSettings, corpora: list[Corpus]) -> list[Corpus]:
    """What recovery fits on: each task corpus's first --recover-samples, then the generic passages
    (auto: as many as those samples); a DietError if there are not that many passages."""
    heads = [corpus.head(settings.recover_samples) for corpus in corpora]
    samples = sum(len(corpus.ids) for corpus in heads)
    generic = samples if settings.recover_generic is None else settings.recover_generic
    return heads + ([generic_corpus(generic)] if generic else [])


def recovery_parts(recover: str) -> tuple[str, ...]:
    """What recovery refits: nothing, the readers (lsq), or everything (full)."""
    return {"none": (), "lsq": ("readers",), "full": PARTS}[recover]


def batch_tokens(device: torch.device, width: int) -> int:
    """Padded tokens per calibration batch: 4,096 on a CPU (large matmuls, bounded memory); on a GPU as
    many as keep a batch's widest activations (about 16 x width floats per token) within 5% of its free
    memory, between 4,096 and 65,536."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    free = torch.cuda.mem_get_info(device)[0]
    return int(min(65536, max(CPU_BATCH_TOKENS, free * 0.05 // (16 * width * 4))))


def batching(calibration: CalibrationSettings, device: torch.device, width: int) -> Batching:
    return Batching(calibration.batch_size, calibration.max_length, batch_tokens(device, width))


@dataclass(frozen=True)
class Plan:
    """A prune, resolved: the method and its settings (no `auto` left), the kept width, where and in
    which dtype it computes, how calibration texts are batched, and how the weights are read."""

    method: Method
    settings: PruneSettings
    calibration: CalibrationSettings
    runtime: RuntimeSettings
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype
    batching: Batching
    width: int
    kept: int
    step: int
    stream: bool
    channels: int | None = None  # MLP channels kept in every layer (--mlp-sparsity), None: all

    @property
    def parts(self) -> tuple[str, ...]:
        return recovery_parts(self.settings.recover)

    @property
    def refit(self) -> Refit:
        """What recovery refits, and how."""
        s = self.settings
        return Refit(self.parts, s.recover_alpha, s.recover_alpha_grid, self.channels, s.recover_head)


def make_plan(config, settings: PruneSettings, calibration: CalibrationSettings, runtime: RuntimeSettings,
              stored: torch.dtype, home: torch.device | None = None, dtype: torch.dtype | None = None,
              weight_bytes: Callable[[torch.dtype], int] | None = None, score_site: str | None = None
              ) -> Plan:
    """Resolve every option for a model of `config` whose checkpoint stores `stored`. A model already in
    memory gives `home` (where it computes) and its `dtype`; `weight_bytes(dtype)` (a checkpoint's size
    in a dtype) decides `weights auto` for a model still on disk."""
    method = get_method(settings.method)
    settings = replace(settings, recover=resolve_recover(method, settings.recover))
    if method.kind == "structural" and settings.recover != "none":
        raise DietError(f"{method.name} chooses its own structure, not a mask of hidden dims: "
                        "--recover does not apply")
    calibration = replace(calibration, site=score_site or resolve_site(calibration.site, settings.recover))
    adapter_for(config)
    device = home if home is not None and runtime.device == "auto" else resolve_device(runtime.device)
    dtype = dtype if dtype is not None else compute_dtype(runtime.dtype, device)
    step = kept_width_step(config, settings.sparsity, settings.round_to)
    k = kept_width(config.hidden_size, settings.sparsity, step)
    stream = runtime.weights == "stream" or (runtime.weights == "auto" and weight_bytes is not None
                                             and weight_bytes(dtype) > FIT_FRACTION * free_memory(device))
    if stream and runtime.device_map is not None:
        raise DietError("--weights stream reads one block at a time onto one device; it does not take "
                        "--device-map")
    if settings.recover_alpha_grid and settings.recover == "none":
        raise DietError("--recover-alpha-grid chooses the refit's damping: it needs --recover lsq or full")
    if settings.recover_head != "gains" and settings.recover != "full":
        raise DietError(f"--recover-head {settings.recover_head} refits the head in --recover full, not "
                        f"{settings.recover}")
    saved = save_dtype(runtime.save_dtype, stored, dtype)
    return Plan(method, settings, calibration, runtime, device, dtype, saved,
                batching(calibration, device, config.hidden_size), config.hidden_size, k, step, stream,
                kept_channels(config, settings))


def kept_channels(config, settings: PruneSettings) -> int | None:
    """MLP channels every layer keeps under --mlp-sparsity (the nearest count; None when it is 0). They are
    chosen and refit by recovery's writer fit, so they need --recover full."""
    if not settings.mlp_sparsity:
        return None
    if settings.recover != "full":
        raise DietError(f"--mlp-sparsity refits down_proj on the kept channels: it needs --recover full, "
                        f"not {settings.recover}")
    adapter_for(config).require("--mlp-sparsity", "parallel_block")
    width = config.intermediate_size
    kept = width - round(settings.mlp_sparsity * width)
    if kept < 1:
        raise DietError(f"--mlp-sparsity {settings.mlp_sparsity:g} removes all {width} MLP channels of a "
                        "layer; at least one must stay")
    return None if kept == width else kept
