"""Checkpoint files read and written one tensor at a time.

A model larger than memory is pruned from its files into its output files (`Checkpoint` reads the dense
blocks, `CheckpointWriter` writes the pruned ones), and saving a model in memory never makes a converted
copy of all of it: each tensor is converted to the saved dtype on the host as it is written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dietprune.errors import DietError, first_line

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 << 30  # a shard is written (and its host copies freed) once it holds this much
READ_BYTES = 64 << 20  # a tensor read in another dtype is converted this much at a time
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Checkpoint:
    """The safetensors files of a model directory, read a few tensors at a time (files are opened per
    read, so nothing stays mapped)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.directory.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    self.files |= dict.fromkeys(f.keys(), path)
        if not self.files:
            raise DietError(f"{self.directory} holds no safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str], device: torch.device, dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
        """The named tensors on `device`, floating ones in `dtype` (if given). A tensor that changes dtype
        is converted a block of rows at a time into its place, the file opened per block: a mapped page
        counts as the process's memory until its file is closed, so memory holds the converted tensor
        and one block of the file, never the tensor twice over."""
        out = {}
        for name in names:
            path = self.files[name]
            try:
                with safe_open(path, "pt") as f:
                    view = f.get_slice(name)
                    shape, stored = view.get_shape(), view.get_dtype()
                if dtype is None or stored not in FLOATS or not shape or FLOATS[stored] == dtype:
                    with safe_open(path, "pt", device=str(device)) as f:
                        out[name] = f.get_tensor(name)
                    continue
                tensor = torch.empty(shape, dtype=dtype, device=device)
                rows = max(1, READ_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
                for start in range(0, shape[0], rows):
                    with safe_open(path, "pt") as f:
                        tensor[start:start + rows] = f.get_slice(name)[start:start + rows].to(device, dtype)
                out[name] = tensor
            except (SafetensorError, OSError) as exc:
                raise DietError(f"cannot read {path}: {first_line(exc)}") from exc
        return out

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start:stop of a matrix, read from the file alone (a vocabulary-sized matrix in parts)."""
        with safe_open(self.files[name], "pt") as f:
            tensor = f.get_slice(name)[start:stop]
        return tensor.to(dtype) if dtype else tensor

    def shape(self, name: str) -> list[int]:
        with safe_open(self.files[name], "pt") as f:
            return f.get_slice(name).get_shape()

    def fingerprint(self) -> str:
        """A short hash of the files' names, sizes, modification times and headers: it changes when a
        file is rewritten, without reading the weights."""
        digest = hashlib.sha256()
        for path in sorted(set(self.files.values())):
            stat = path.stat()
            with path.open("rb") as f:
                header = f.read(struct.unpack("<Q", f.read(8))[0])
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode() + header)
        return digest.hexdigest()[:16]


Transform = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class CheckpointWriter:
    """Writes tensors into safetensors shards in the order they come, each converted to `dtype` on the
    host as it arrives; a shard is written once it holds `shard_bytes` (a tensor is never split). One
    shard is named model.safetensors, several model-0000i-of-0000n.safetensors with their index, as
    save_pretrained names them. `transform(name, tensor)` may rename, rescale or add tensors (the
    serving rewrites of models/serving.py)."""

    def __init__(self, directory: Path, dtype: torch.dtype, transform: Transform | None = None,
                 shard_bytes: int = SHARD_BYTES):
        self.directory, self.dtype, self.transform, self.shard_bytes = Path(directory), dtype, transform, \
            shard_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for key, value in (self.transform(name, tensor) if self.transform else {name: tensor}).items():
            value = value.detach()
            if value.is_floating_point():
                value = value.to("cpu", self.dtype)
            self.pending[key] = value.to("cpu").contiguous()
            self.total += self.pending[key].numel() * self.pending[key].element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    @property
    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pending.values())

    def flush(self) -> None:
        """Write what is pending as a shard of its own."""
        if self.pending:
            save_file(self.pending, self.directory / f".shard-{len(self.shards)}.safetensors",
                      metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending = {}

    def close(self) -> None:
        """Write what is pending, name the shards, and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.directory / f".shard-{i}.safetensors").rename(self.directory / name)
        if n > 1:
            weight_map = {key: name for keys, name in zip(self.shards, names, strict=True) for key in keys}
            (self.directory / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
