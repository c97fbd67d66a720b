"""Atomic outputs: everything is written to a temporary sibling and renamed into place, so a fault
leaves either the old state or the complete new one, and says which.

Commit is decided at the rename, not before: without overwrite, an output that appeared while a run
was writing (another run to the same path) is never replaced. The rename then refuses with EEXIST
(Linux renameat2 RENAME_NOREPLACE; elsewhere a hard link for a file, and rename's refusal to replace
a non-empty directory), this run's complete result is kept beside it, and the error says where. With
overwrite, a directory is swapped in with RENAME_EXCHANGE, so the path always holds a complete output."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError

from dietprune.errors import DietError, first_line

IfExists = Literal["refuse", "replace", "discard"]
"""What a commit does when the output exists at the rename: refuse (keep the result beside it and
fail), replace it atomically, or discard this result (a cache: the other writer's copy is as good)."""

WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk as SafetensorError
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


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


def cannot_write(path: Path, exc: BaseException) -> DietError:
    """The one-line error of a failed write: the path and the system's cause (no space, read-only...)."""
    if isinstance(exc, OSError) and exc.strerror:
        cause = exc.strerror
    elif code := re.search(r"\(os error (\d+)\)", str(exc)):  # safetensors' wording of an OSError
        cause = os.strerror(int(code[1]))
    else:
        cause = first_line(exc)
    return DietError(f"cannot write {path}: {cause}; nothing was written there")


def ensure_dir(path: Path) -> None:
    """mkdir -p, failing with one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from exc


@contextlib.contextmanager
def atomic_dir(out: Path, if_exists: IfExists = "refuse") -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it becomes `out`, on failure it vanishes.

    The temporary name carries the process id, so leftovers of a killed run (SIGKILL skips every
    clean-up) are recognised and removed by the next run to the same output."""
    with _temporary(out, directory=True) as tmp:
        yield tmp
        _commit(tmp, out, if_exists)


@contextlib.contextmanager
def atomic_file(path: Path, if_exists: IfExists = "replace") -> Iterator[Path]:
    """Yield a temporary file path next to `path` to write; on success it becomes `path`."""
    with _temporary(path, directory=False) as tmp:
        yield tmp
        _commit(tmp, path, if_exists)


def commit_dir(directory: Path, out: Path, if_exists: IfExists = "refuse") -> None:
    """Make a complete directory written elsewhere (a streamed prune's staging folder) `out`, atomically:
    renamed when it is on the same file system, else copied into a temporary sibling first."""
    try:
        _commit(directory, out, if_exists)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise cannot_write(out, exc) from exc
        with atomic_dir(out, if_exists) as tmp:
            shutil.copytree(directory, tmp, dirs_exist_ok=True)
        shutil.rmtree(directory, ignore_errors=True)


def write_atomic(path: Path, text: str, if_exists: IfExists = "replace") -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path, if_exists) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: object, if_exists: IfExists = "replace") -> None:
    """Write `data` as indented JSON atomically."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", if_exists)


@contextlib.contextmanager
def _temporary(out: Path, directory: bool) -> Iterator[Path]:
    """A temporary sibling of `out` with the new-file permissions; removed unless it was committed.
    Every write error inside becomes one DietError naming `out`."""
    prefix = f".{out.name}.{os.getpid()}."
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        raise cannot_write(out, exc) from exc
    try:
        yield tmp
    except WRITE_ERRORS as exc:
        raise cannot_write(out, exc) from exc
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _commit(tmp: Path, out: Path, if_exists: IfExists) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp, *tmp.rglob("*")):  # mkdtemp, mkstemp and safetensors make private files
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    try:
        _rename_noreplace(tmp, out)
        return
    except FileExistsError:
        if if_exists == "discard":
            return
        if if_exists == "replace":
            _replace(tmp, out)
            return
    kept = out.with_name(f"{out.name}.{os.getpid()}.kept")
    _rename_noreplace(tmp, kept)
    raise DietError(f"{out} appeared while this run was writing it (another run?) and was left as it is; "
                    f"this run's complete result is in {kept}")


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the system or file system has none (then the caller falls back)."""
    call = getattr(_LIBC, "renameat2", None)
    if call is None:
        return False
    at_cwd = -100
    if call(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, or FileExistsError if `dst` exists, decided atomically by the file system."""
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    if src.is_dir():  # rename refuses a non-empty target directory; the check covers the rest
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from exc
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def _replace(src: Path, dst: Path) -> None:
    """Put `src` in the place of the existing `dst`; `dst` never stops holding a complete output."""
    if not src.is_dir():
        os.replace(src, dst)
    elif _renameat2(src, dst, RENAME_EXCHANGE):
        shutil.rmtree(src)  # now the old output
    else:  # a moment without `dst`; a crash in it is repaired by _remove_leftovers
        old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)


def _remove_leftovers(out: Path) -> None:
    """Delete temporaries of dead runs; a replaced output a dead run had set aside is put back."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(\d+)\.(?:\w+\.tmp|old)", path.name)
        if not match or _alive(int(match[1])):
            continue
        if path.suffix == ".old" and not out.exists():
            path.rename(out)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise DietError(f"{path} is not a readable {what} ({cause})") from exc
