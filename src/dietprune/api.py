"""What the CLI and notebooks call: profile_tasks(), prune() and their settings.

The data flows one way: load -> profile (per task, cached) -> merge -> slice -> save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

import dietprune
from dietprune import tasks as task_registry
from dietprune.errors import DietError
from dietprune.io import atomic_dir, check_output_path
from dietprune.merge import kept_width, merge, task_votes
from dietprune.models.adapters import adapter_for
from dietprune.models.load import ModelSource, cache_root, load_config, load_model, resolve
from dietprune.profile import ActivationStats, profile
from dietprune.scores import load_scores, model_fingerprint, save_scores
from dietprune.slice import kept_width_step, slice_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSettings:
    """How calibration data is drawn and profiled. Calibration text = task prompt + gold answer."""

    tasks: tuple[str, ...] = task_registry.DEFAULT_TASKS
    samples: int = 100
    seed: int = 0
    site: str = "block_output"
    max_length: int = 1024
    batch_size: int = 8
    data_source: str = "offline"


@dataclass(frozen=True)
class PruneSettings:
    """How scores become a mask: sparsity -> K (a multiple of round_to and of the head count)."""

    sparsity: float = 0.2
    round_to: int = 8
    merge: str = "vote"
    aggregation: str = "l1"


@dataclass
class PruneResult:
    """What prune() did, as recorded in the output's dietprune.json."""

    out: Path
    record: dict = field(default_factory=dict)


def calibration_texts(task: str, settings: ProfileSettings) -> tuple[list[str], list[str]]:
    """(ids, texts) of the seeded calibration subset of `task`."""
    examples = task_registry.load_examples(task, settings.data_source)
    calib_ids, _ = task_registry.split_ids(examples, settings.samples, settings.seed)
    by_id = {ex.id: ex for ex in examples}
    return calib_ids, [by_id[i].calibration_text() for i in calib_ids]


def profile_tasks(model, tokenizer, source: ModelSource, settings: ProfileSettings,
                  use_cache: bool = True) -> tuple[dict[str, ActivationStats], dict]:
    """Per-task activation stats and their metadata; finished tasks are cached and reused."""
    adapter_for(model.config)
    fingerprint = model_fingerprint(model)
    stats, task_meta = {}, {}
    for task in settings.tasks:
        ids, texts = calibration_texts(task, settings)
        key = _cache_key(fingerprint, task, ids, settings)
        cached = cache_root() / "scores" / f"{key}.safetensors"
        if use_cache and cached.is_file():
            stats[task] = load_scores(cached)[0][task]
        else:
            stats[task] = profile(model, tokenizer, texts, settings.site, settings.batch_size,
                                  settings.max_length, desc=f"profile {task}")
            save_scores(cached, {task: stats[task]}, {"tasks": [task], "key": key})
        task_meta[task] = {"ids": ids, "tokens": stats[task].tokens}
    meta = {"model": source.name, "model_fingerprint": fingerprint,
            "hidden_size": model.config.hidden_size, "settings": asdict(settings), "tasks": task_meta,
            "versions": versions()}
    return stats, meta


def _cache_key(fingerprint: str, task: str, ids: list[str], settings: ProfileSettings) -> str:
    parts = [fingerprint, task, ",".join(ids), settings.site, str(settings.max_length),
             settings.data_source, dietprune.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def versions() -> dict[str, str]:
    """Library versions that determine the numbers."""
    return {"dietprune": dietprune.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def prune(model_spec: str | None, out: Path, settings: PruneSettings = PruneSettings(),
          profile_settings: ProfileSettings = ProfileSettings(), scores_path: Path | None = None,
          overwrite: bool = False) -> PruneResult:
    """Profile (or read scores), merge into one mask, slice, and save a standard HF checkpoint."""
    started = time.perf_counter()
    source = resolve(model_spec)
    check_output_path(out, overwrite, protected=(Path(source.path),) if Path(source.path).exists() else ())
    config = load_config(source)
    adapter_for(config)
    d = config.hidden_size
    k = kept_width(d, settings.sparsity, kept_width_step(config, settings.round_to))
    if scores_path is not None:
        stats, meta = load_scores(scores_path)
        if meta.get("hidden_size") != d:
            raise DietError(f"{scores_path} was profiled on a model of width {meta.get('hidden_size')}, "
                            f"not {d}; profile this model")
    model, tokenizer, source = load_model(model_spec)
    if scores_path is None:
        stats, meta = profile_tasks(model, tokenizer, source, profile_settings)
    task_names = list(stats)
    scores = torch.stack([stats[t].score(settings.aggregation) for t in task_names])
    keep = merge(scores, k, settings.merge)
    params_before = sum(p.numel() for p in model.parameters())
    sliced = slice_model(model, keep)
    del model
    params_after = sum(p.numel() for p in sliced.parameters())
    record = {
        "format": "dietprune.model/1",
        "source_model": source.name,
        "hidden_size_before": d,
        "hidden_size_after": k,
        "kept_dims": keep.tolist(),
        "params_before": params_before,
        "params_after": params_after,
        "prune": asdict(settings),
        "profile": meta,
        "task_agreement": agreement(scores, keep, task_names),
    }
    with atomic_dir(out) as tmp:
        sliced.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "dietprune.json").write_text(json.dumps(record, indent=2) + "\n")
    return PruneResult(out, record)


def agreement(scores: torch.Tensor, keep: torch.Tensor, task_names: list[str]) -> dict[str, int]:
    """For each task, how many of its own top-K dims the global mask keeps."""
    votes = task_votes(scores, len(keep))
    return {t: int(votes[i, keep].sum()) for i, t in enumerate(task_names)}
