"""Per-corpus activation statistics on disk: score files (safetensors + JSON provenance) and the profile
cache that lets an interrupted run resume with the corpora it had finished.

A score file holds, for every task, the token-weighted sums behind the scores, so both aggregations and
any later merge can be computed from it; the metadata records model, settings and calibration ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dietprune.calibration import Corpus, is_main_process
from dietprune.device import cpu_tensors
from dietprune.errors import DietError
from dietprune.io import IfExists, atomic_file, cache_root
from dietprune.profile import ActivationStats, profile
from dietprune.settings import CalibrationSettings
from dietprune.version import __version__

FORMAT = "dietprune.scores/1"


def save_scores(path: Path, stats: dict[str, ActivationStats], meta: dict,
                if_exists: IfExists = "replace") -> None:
    """Write per-task stats and metadata atomically."""
    tensors = {}
    for task, s in stats.items():
        tensors |= {f"{task}.sum_abs": s.sum_abs, f"{task}.sum_sq": s.sum_sq,
                    f"{task}.tokens": torch.tensor(s.tokens, dtype=torch.int64)}
    with atomic_file(path, if_exists) as tmp:
        save_file(tensors, tmp, metadata={"dietprune": json.dumps({"format": FORMAT, **meta},
                                                                  sort_keys=True)})


def load_scores(path: Path) -> tuple[dict[str, ActivationStats], dict]:
    """Read a score file; a missing, truncated or foreign file is a one-line DietError."""
    if not path.is_file():
        raise DietError(f"score file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("dietprune", "{}"))
        tensors = load_file(path)
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as exc:
        raise DietError(f"{path} is not a readable score file ({exc}); re-run `diet profile`") from exc
    if meta.get("format") != FORMAT:
        raise DietError(f"{path} is not a dietprune score file (format {meta.get('format')!r})")
    try:
        stats = {task: ActivationStats(tensors[f"{task}.sum_abs"], tensors[f"{task}.sum_sq"],
                                       int(tensors[f"{task}.tokens"]))
                 for task in meta["tasks"]}
    except KeyError as exc:
        raise DietError(f"{path} lacks {exc}; the file is incomplete, re-run `diet profile`") from exc
    return stats, meta


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short sha256 of the config and of every tensor's name and bytes (~1 s per GB; offloaded
    modules are read one at a time)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in cpu_tensors(model):
        digest.update(name.encode())
        digest.update(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def profile_corpora(model, tokenizer, fingerprint: str, corpora: list[Corpus], settings: CalibrationSettings,
                    use_cache: bool = True) -> dict[str, ActivationStats]:
    """Activation stats per corpus; each finished corpus is cached under its key and reused."""
    stats = {}
    for corpus in corpora:
        key = _cache_key(fingerprint, corpus, settings)
        cached = cache_root() / "scores" / f"{key}.safetensors"
        if use_cache and cached.is_file():
            stats[corpus.name] = load_scores(cached)[0][corpus.name]
            continue
        stats[corpus.name] = profile(model, tokenizer, corpus.texts, settings.site, settings.batch_size,
                                     settings.max_length, desc=f"profile {corpus.name}")
        if is_main_process():
            save_scores(cached, {corpus.name: stats[corpus.name]}, {"tasks": [corpus.name], "key": key})
    return stats


def _cache_key(fingerprint: str, corpus: Corpus, settings: CalibrationSettings) -> str:
    """The model, the corpus's texts themselves (a user's file may change under the same ids), and the
    settings that change the statistics."""
    texts = hashlib.sha256("\0".join(corpus.texts).encode()).hexdigest()
    parts = [fingerprint, corpus.name, ",".join(corpus.ids), texts, settings.site, str(settings.max_length),
             __version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
