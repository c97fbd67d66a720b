"""Per-corpus activation statistics on disk: score files (safetensors + JSON provenance) and the profile
cache, keyed by a fingerprint of the model, so a later run reuses the corpora it has seen.

A score file holds, for every task, the token-weighted sums behind the scores, so both aggregations and
any later merge can be computed from it; the metadata records model, settings and calibration ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dietprune.calibration import Corpus, is_main_process
from dietprune.errors import DietError, first_line
from dietprune.io import IfExists, atomic_file, cache_root
from dietprune.profile import ActivationStats
from dietprune.sequential import Weights, has_meta
from dietprune.settings import CalibrationSettings
from dietprune.version import __version__

log = logging.getLogger(__name__)

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
    if path.is_dir():
        raise DietError(f"{path} is a directory, not a score file; give the .safetensors file diet profile "
                        "wrote")
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


def model_fingerprint(weights: Weights) -> str:
    """A short hash that changes when the weights do, for the profile cache. A model streamed from its
    checkpoint: the config and the files' names, sizes, times and headers (nothing read). A model in
    memory: the config and every tensor's name, shape and bytes (hashed in place, ~1 s per GB), or on an
    accelerator three float64 moments (sum, sum of squares, index-weighted sum) computed where the tensor
    lies; modules accelerate offloaded are onloaded one at a time. No weight is moved or replaced, and
    tied tensors stay tied. Memoised per model while its parameters are unchanged (their version
    counters), so a sweep fingerprints its model once."""
    model = weights.model
    versions = _versions(model)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and versions is not None and memo[0] == versions:
        return memo[1]
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if weights.checkpoint is not None:
        digest.update(weights.checkpoint.fingerprint().encode())
    else:
        for prefix, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if not own:
                continue
            with weights.onloaded(prefix) if has_meta(module) else contextlib.nullcontext(module) as real:
                for name in own:
                    tensor = getattr(real, name)
                    digest.update(f"{prefix}.{name}{tuple(tensor.shape)}".encode())
                    if tensor.device.type == "cpu":
                        digest.update(memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()))
                    else:
                        digest.update(_moments(tensor).cpu().numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    _FINGERPRINTS[model] = (versions, fingerprint)
    return fingerprint


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _versions(model: torch.nn.Module) -> tuple[int, ...] | None:
    """The parameters' version counters (bumped by every in-place change), or None where a tensor made
    under inference mode has none."""
    try:
        return tuple(p._version for p in model.parameters())
    except RuntimeError:
        return None
MOMENT_CHUNK = 1 << 22  # elements per float64 chunk


@torch.no_grad()
def _moments(tensor: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, index-weighted sum) of a tensor's values in float64, chunk by chunk."""
    flat = tensor.detach().reshape(-1)
    out = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, len(flat), MOMENT_CHUNK):
        chunk = flat[start:start + MOMENT_CHUNK].double()
        index = torch.arange(start, start + len(chunk), dtype=torch.float64, device=flat.device)
        out += torch.stack([chunk.sum(), chunk.square().sum(), (chunk * index).sum() / max(len(flat), 1)])
    return out


def cache_path(fingerprint: str, corpus: Corpus, settings: CalibrationSettings) -> Path:
    """Where a corpus's statistics are cached: keyed by the model, the corpus's texts themselves (a
    user's file may change under the same ids), and the settings that change the statistics."""
    texts = hashlib.sha256("\0".join(corpus.texts).encode()).hexdigest()
    parts = [fingerprint, corpus.name, ",".join(corpus.ids), texts, settings.site, str(settings.max_length),
             __version__]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return cache_root() / "scores" / f"{key}.safetensors"


def cached_stats(path: Path, name: str) -> ActivationStats | None:
    """A corpus's cached statistics; a damaged cache entry is deleted with a warning (it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return load_scores(path)[0][name]
    except (DietError, KeyError) as exc:
        log.warning("rebuilding a damaged cache entry %s (%s)", path.name, first_line(exc)[:100])
        path.unlink(missing_ok=True)
        return None


def store_stats(path: Path, name: str, stats: ActivationStats) -> None:
    if is_main_process():
        save_scores(path, {name: stats}, {"tasks": [name], "key": path.stem})
