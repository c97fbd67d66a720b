"""Score files: per-task activation statistics (safetensors) with their provenance (JSON metadata).

One file holds, for every task, the token-weighted sums behind the scores, so both aggregations and
any later merge can be computed from it; the metadata records model, site, seed and calibration ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dietprune.errors import DietError
from dietprune.profile import ActivationStats

FORMAT = "dietprune.scores/1"


def save_scores(path: Path, stats: dict[str, ActivationStats], meta: dict) -> None:
    """Write per-task stats and metadata atomically."""
    tensors = {}
    for task, s in stats.items():
        tensors |= {f"{task}.sum_abs": s.sum_abs, f"{task}.sum_sq": s.sum_sq,
                    f"{task}.tokens": torch.tensor(s.tokens, dtype=torch.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"dietprune": json.dumps({"format": FORMAT, **meta}, sort_keys=True)})
    tmp.replace(path)


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
    """A short sha256 of the config and of every tensor's name and bytes (~1 s per GB)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]
