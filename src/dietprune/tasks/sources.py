"""The user's own calibration data (`--calibration`): text, JSONL, CSV and Parquet files, and hub data
sets, each one task in the vote, or several when a task column splits it.

A source is one of
  PATH            .txt (one sample per line; per paragraph when the file has blank lines), .jsonl,
                  .csv or .parquet (the text in --text-field); PATH@sha256:HEX refuses a file whose
                  content changed (pruned models record their sources so);
  hub:ORG/NAME[:CONFIG[:SPLIT]]  a data set from the hub (split default: train), text in --text-field.
A source is one task named after the file (or data set), or, when its rows have a --task-field column,
one task per value, named SOURCE/VALUE. A sample's id is its row number (its line or paragraph in a
text file), counting rows without text too, so ids stay stable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dietprune.errors import DietError, first_line

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Rows:
    """One task from a source: (id, text) of every row, and where they came from (for the record)."""

    name: str
    rows: tuple[tuple[str, str], ...]
    source: dict


def read_source(spec: str, text_field: str = "text", task_field: str = "task") -> list[Rows]:
    """The tasks a --calibration source holds, in the order their names first appear."""
    if spec.startswith("hub:"):
        return _split(_hub_rows(spec), spec.removeprefix("hub:").split(":")[0].split("/")[-1],
                      {"hub": spec.removeprefix("hub:")}, text_field, task_field, spec)
    path_text, _, pin = spec.partition("@sha256:")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise DietError(f"calibration file {path} is a folder; give the files in it")
    if not path.is_file():
        raise DietError(f"calibration file not found: {path}")
    if path.suffix not in FORMATS:
        raise DietError(f"calibration file {path}: unknown format {path.suffix!r}; give one of "
                        f"{', '.join(FORMATS)}")
    try:
        digest = _sha256(path)
    except OSError as exc:
        raise DietError(f"cannot read calibration file {path}: {exc.strerror or exc}") from exc
    if pin and pin != digest:
        raise DietError(f"calibration file {path} changed since it was recorded (sha256 {pin[:12]}..., now "
                        f"{digest[:12]}...)")
    source = {"path": str(path.resolve()), "sha256": digest, "format": path.suffix[1:]}
    return _split(_file_rows(path), path.stem, source, text_field, task_field, spec)


def pinned(spec: str) -> str:
    """The source with its file's content pinned (PATH@sha256:HEX, an absolute path): as recorded."""
    if spec.startswith("hub:"):
        return spec
    path = Path(spec.partition("@sha256:")[0]).expanduser().resolve()
    return f"{path}@sha256:{_sha256(path)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _file_rows(path: Path) -> list[tuple[str, dict]]:
    """The rows of a file as dicts, each with where it is in the file ("line 3"); a text file's rows have
    a "text" key only."""
    if path.suffix == ".txt":
        text = _text(path)
        parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text.strip()) else text.splitlines()
        return [(f"row {i}", {"text": part.strip()}) for i, part in enumerate(parts)]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DietError(f"calibration file {path}: line {number} is not valid JSON ({exc.msg}, "
                                f"column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DietError(f"calibration file {path}: line {number} is not a JSON object")
            rows.append((f"line {number}", row))
        return rows
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_text(path), newline=""))
        try:
            return [(f"line {reader.line_num}", row) for row in reader]
        except csv.Error as exc:  # the reader has not counted the line it failed on
            raise DietError(f"calibration file {path}: line {reader.line_num + 1}: {exc}") from exc
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except OSError as exc:
        raise DietError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, ...) are not all ValueErrors
        raise DietError(f"calibration file {path} is not a readable Parquet file: {exc}") from exc
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _text(path: Path) -> str:
    """A file's text, or one line saying why it cannot be read (the line that is not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DietError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DietError(f"calibration file {path}: line {line} is not UTF-8 text (byte "
                        f"0x{data[exc.start]:02x})") from exc


def _hub_rows(spec: str) -> list[tuple[str, dict]]:
    name, config, split = (spec.removeprefix("hub:").split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as exc:
        raise DietError("hub calibration data needs the `datasets` package: pip install datasets") from exc
    try:
        rows = datasets.load_dataset(name, config, split=split or "train").to_list()
    except Exception as exc:  # noqa: BLE001 (network, missing data set, missing config: each a user error)
        raise DietError(f"cannot load {spec}: {first_line(exc)}") from exc
    return [(f"row {i}", row) for i, row in enumerate(rows)]


def _split(rows: list[tuple[str, dict]], name: str, source: dict, text_field: str, task_field: str, spec: str
           ) -> list[Rows]:
    """Rows (each with where it is) -> one task, or one per value of the task column; rows without text
    are skipped."""
    if not rows:
        raise DietError(f"calibration source {spec} holds no rows")
    by_task: dict[str, list[tuple[str, str]]] = {}
    for index, (where, row) in enumerate(rows):
        if text_field not in row:
            raise DietError(f"calibration source {spec}: {where} has no {text_field!r} field (it has "
                            f"{', '.join(map(str, row)) or 'none'}); choose the text with --text-field")
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise DietError(f"calibration source {spec}: {where}'s {text_field!r} is {type(text).__name__}, "
                            "not text")
        if not text or not text.strip():
            continue
        task = f"{name}/{row[task_field]}" if task_field in row else name
        by_task.setdefault(task, []).append((str(index), text))
    if not by_task:
        raise DietError(f"calibration source {spec} has no non-empty {text_field!r} texts")
    return [Rows(task, tuple(task_rows), source | {"spec": spec} | ({"task_value": task.split("/", 1)[1]}
                                                                     if task != name else {}))
            for task, task_rows in by_task.items()]
