"""Atomic outputs: everything is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dietprune.errors import DietError


def cache_root() -> Path:
    """The dietprune cache (`$DIETPRUNE_CACHE`, else `~/.cache/dietprune`)."""
    return Path(os.environ.get("DIETPRUNE_CACHE", Path.home() / ".cache" / "dietprune"))


def check_output_path(out: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output (unless `overwrite`) and any output inside a protected directory."""
    out = out.resolve()
    for path in protected:
        path = path.resolve()
        if out == path or path in out.parents or out in path.parents:
            raise DietError(f"output {out} overlaps the input {path}; choose an output path elsewhere")
    if out.exists() and not overwrite:
        raise DietError(f"output {out} already exists; pass --overwrite or choose another path")
    ancestor = _existing_ancestor(out.parent)
    if not ancestor.is_dir():
        raise DietError(f"cannot write to {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise DietError(f"cannot write to {out}: {ancestor} is not writable")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it vanishes.

    The temporary name carries the process id, so leftovers of a killed run (SIGKILL skips every
    clean-up) are recognised and removed by the next run to the same output."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise DietError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        yield tmp
        for path in tmp.rglob("*"):  # safetensors writes 0600 files: make them like any new file
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove_leftovers(out: Path) -> None:
    """Delete temporaries of dead runs; a replaced output a dead run had set aside is put back."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(\d+)\.(?:\w+\.tmp|old)", path.name)
        if not match or _alive(int(match[1])):
            continue
        if path.suffix == ".old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path, what: str) -> object:
    """A JSON file's content; a file that cannot be read or parsed is a one-line DietError naming
    `what` it should have been."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DietError(f"{path} is not a readable {what} ({cause})") from exc


def write_json_atomic(path: Path, data: object) -> None:
    """Write `data` as indented JSON via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
