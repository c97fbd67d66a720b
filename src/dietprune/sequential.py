"""The sequential engine: every pass that learns from calibration text walks the decoder one block at a time.

GPTQ's recipe, used by profiling, recovery and every baseline's statistics:
1. `capture`: run the decoder with each block replaced by a placeholder that records what it is given
   (the residual stream entering block 0, and each block's keyword arguments: masks, rotary tables)
   and passes it on untouched; no block's weights are read;
2. `observe`: for each block, bring its weights to the compute device once (`Weights.onloaded`: from
   the checkpoint files, accelerate's offload, or host memory), run every calibration batch through it,
   let the observers act on what they tap, and pass its outputs on as the next block's inputs.
Memory then holds one block's weights, the calibration hidden states (`Stream`) and the observers'
statistics, whatever the depth. Recovery (recover.py) walks the blocks the same way, with a dense and a
pruned stream side by side.

A block is run as its two sub-blocks, h <- h + output_norm(module(norm(h))) (models/adapters/base.py),
which is exactly what the decoder layers of every supported architecture compute (tested against the
layers' own forward): the taps can then see the normalised inputs of the linear layers and the writers'
inputs, and recovery can refit one sub-block before running the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dietprune.errors import DietError
from dietprune.models.adapters import Adapter, SubBlock, adapter_for
from dietprune.models.edit import embedding_names
from dietprune.models.store import Checkpoint
from dietprune.progress import progress


class StopForward(Exception):
    """Raised inside a forward pass to end it: what the pass was for is collected."""


def to_device(value, device: torch.device):
    """Tensors in nested tuples, lists and dicts moved to `device` (a block's keyword arguments)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def has_meta(module: nn.Module) -> bool:
    """Whether some of the module's weights are not in memory (accelerate's offload, or checkpoint files)."""
    return any(t.device.type == "meta" for t in module.parameters())


class Weights:
    """A model's weights wherever they are, and the device each step computes on.

    resident   on a device (one GPU, the CPU, or several GPUs through accelerate's device_map): a module
               computes where it is when that is an accelerator, else on `device` (moved there for the
               step and back);
    offloaded  accelerate keeps them in CPU memory or on disk (meta tensors in the model): onloaded by
               accelerate's hooks for the step;
    streamed   `checkpoint` holds them (the model was built on meta): read from the files onto `device`
               in `dtype` for the step, and dropped after.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 checkpoint: Checkpoint | None = None):
        self.model, self.device, self.dtype, self.checkpoint = model, torch.device(device), dtype, checkpoint
        self.adapter: Adapter = adapter_for(model.config)
        self.adapter.require("the sequential engine", "parallel_block")
        self.blocks = self.model.get_submodule(self.adapter.layers)
        self.embedding, self.head = embedding_names(model)
        if checkpoint is not None:  # buffers (rotary tables, embedding scales) are built from the config
            _buffers_to(model, self.device)

    @classmethod
    def of(cls, model: nn.Module) -> Weights:
        """A model in memory (or offloaded by accelerate), computing where it is, in its own dtype."""
        real = [p for p in model.parameters() if p.device.type != "meta"]
        weights = cls(model, torch.device("cpu"), real[0].dtype if real else torch.float32)
        weights.device = weights.device_of(model.get_input_embeddings())
        return weights

    def device_of(self, module: nn.Module) -> torch.device:
        """Where `module` computes: the execution device accelerate gave it, the accelerator its weights
        are on, or the compute device."""
        for submodule in module.modules():
            hook = getattr(submodule, "_hf_hook", None)
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        devices = {p.device for p in module.parameters() if p.device.type not in ("meta", "cpu")}
        return devices.pop() if len(devices) == 1 else self.device

    @contextlib.contextmanager
    def onloaded(self, name: str) -> Iterator[nn.Module]:
        """Module `name` with its weights on the device it computes on, for the duration."""
        module = self.model.get_submodule(name)
        device = self.device_of(module)
        if self.checkpoint is not None and has_meta(module):
            keys = module.state_dict(keep_vars=True)
            files = {key: self._file_key(f"{name}.{key}") for key in keys}
            read = self.checkpoint.read(set(files.values()), device, self.dtype)
            module.load_state_dict({key: read[files[key]] for key in keys}, strict=True, assign=True)
            _buffers_to(module, device)
            try:
                yield module
            finally:
                to_meta(module)
                release_freed_memory()
        elif hooks := _offload_hooks(module):  # onloaded once for every batch of the step, not per call
            for submodule, hook in hooks:
                hook.pre_forward(submodule)
                hook.offload = False
            try:
                yield module
            finally:
                for submodule, hook in hooks:
                    hook.offload = True
                    hook.post_forward(submodule, None)
        else:
            where = {p.device for p in module.parameters()}
            if where == {device} or not where:
                yield module
                return
            original = where.pop()
            module.to(device)
            try:
                yield module
            finally:
                module.to(original)

    def _file_key(self, name: str) -> str:
        """The checkpoint's name for a tensor: a tied head is stored as the embedding only."""
        if name not in self.checkpoint and name == f"{self.head}.weight":
            return f"{self.embedding}.weight"
        if name not in self.checkpoint:
            raise DietError(f"{self.checkpoint.directory} has no tensor {name}; its names differ from the "
                            "model's, so it cannot be streamed: use --weights load")
        return name

    def tensors(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(full name, tensor) of module `name`'s own state, on the device it computes on."""
        with self.onloaded(name) as module:
            for key, tensor in module.state_dict().items():
                yield f"{name}.{key}", tensor

    def streamed(self, name: str) -> bool:
        """Whether module `name`'s weights are read from the checkpoint files."""
        return self.checkpoint is not None and has_meta(self.model.get_submodule(name))

    def rows(self, name: str, chunk: int) -> Iterator[torch.Tensor]:
        """The rows of matrix `name` (a vocabulary-sized embedding or head), `chunk` at a time, in the
        compute dtype: read from the file in parts when streamed, so the whole matrix is never held."""
        module_name, _, key = name.rpartition(".")
        if self.streamed(module_name):
            file_key = self._file_key(name)
            total = self.checkpoint.shape(file_key)[0]
            for start in range(0, total, chunk):
                yield self.checkpoint.rows(file_key, start, start + chunk, self.dtype).to(self.device)
            return
        with self.onloaded(module_name) as module:
            matrix = getattr(module, key)
            for start in range(0, matrix.shape[0], chunk):
                yield matrix[start:start + chunk]

    def gather(self, name: str, index: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
        """Rows `index` (ascending) of matrix `name`, read a chunk of rows at a time."""
        parts, start = [], 0
        for rows in self.rows(name, chunk):
            inside = index[(index >= start) & (index < start + len(rows))]
            parts.append(rows[inside.to(rows.device) - start])
            start += len(rows)
        return torch.cat(parts)


def _offload_hooks(module: nn.Module) -> list:
    """(submodule, accelerate hook) of every part of `module` whose weights accelerate offloads. Each
    hook loads its weights before and drops them after every forward call; within `Weights.onloaded`
    its `offload` is off, so the weights stay for all of a step's batches and its own reads."""
    from accelerate.hooks import AlignDevicesHook

    return [(m, m._hf_hook) for m in module.modules()
            if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and m._hf_hook.offload]


def release_freed_memory() -> None:
    """Hand memory the allocator holds on to back to the system (glibc's malloc_trim): without it the
    freed blocks' smaller buffers fragment the heap and the resident size creeps up block after block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None


def to_meta(module: nn.Module) -> None:
    """Drop a module's weights (they are read again when needed): parameters become meta tensors."""
    for submodule in module.modules():
        for key, param in submodule._parameters.items():
            if param is not None:
                submodule._parameters[key] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                          requires_grad=False)


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for submodule in module.modules():
        for key, buffer in submodule._buffers.items():
            if buffer is not None and buffer.device != device:
                submodule._buffers[key] = buffer.to(device)


@dataclass
class Stream:
    """The calibration batches at the current block: per batch, the residual stream (rows, seq, width),
    which tokens are real (rows, seq), the decoder's keyword arguments for every block, and the index of
    the corpus (calibration task) the batch's texts come from. Hidden states live on `storage`: the
    compute device when they fit comfortably, else host memory."""

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor]
    kwargs: list[list[dict]]
    groups: list[int]
    storage: torch.device
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.hidden)

    def real(self, b: int, x: torch.Tensor) -> torch.Tensor:
        """Batch b's real tokens of `x` (rows, seq, width) -> (tokens, width): a gather by indices found
        once per batch, so a GPU does not wait on a host sync at every tap."""
        if b not in self._rows:
            self._rows[b] = self.masks[b].reshape(-1).nonzero().squeeze(1)
        return x.reshape(-1, x.shape[-1]).index_select(0, self._rows[b].to(x.device))

    def tokens(self, group: int | None = None) -> int:
        return sum(int(m.sum()) for m, g in zip(self.masks, self.groups, strict=True) if group in (None, g))

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Stream:
        """A stream with the same batches, its hidden states fn(hidden) (a pruned model's stream)."""
        return Stream([fn(h) for h in self.hidden], self.masks, self.kwargs, self.groups, self.storage,
                      self._rows)


class _Placeholder(nn.Module):
    """Stands for block `index` while the stream is captured: records what the decoder gives it, passes
    the hidden states on untouched, and ends the forward pass after the last block."""

    def __init__(self, index: int, last: int, record: Callable[[int, torch.Tensor, dict], None]):
        super().__init__()
        self.index, self.last, self.record = index, last, record

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise DietError("the decoder passes its blocks positional arguments besides the hidden states; "
                            "this architecture is not supported by the sequential engine")
        self.record(self.index, hidden_states, kwargs)
        if self.index == self.last:
            raise StopForward
        return hidden_states


@torch.inference_mode()
def capture(weights: Weights, batches: list[dict[str, torch.Tensor]], groups: list[int] | None = None
            ) -> Stream:
    """The stream entering block 0 for every batch, and every block's keyword arguments (shared objects:
    blocks of one attention type receive the same tensors). Only the embedding's weights are read."""
    model, blocks = weights.model, weights.blocks
    hidden, kwargs = [], []

    def record(index: int, h: torch.Tensor, kw: dict) -> None:
        if index == 0:
            hidden.append(h)
            kwargs.append([])
        kwargs[-1].append(kw)

    originals = list(blocks)
    with _embedding_for(weights, batches) as (embedding, remap):
        device = weights.device_of(embedding)
        try:
            for i in range(len(blocks)):
                blocks[i] = _Placeholder(i, len(blocks) - 1, record)
            for batch in batches:
                inputs = batch | {"input_ids": remap(batch["input_ids"])}
                inputs = {key: value.to(device) for key, value in inputs.items()}
                with contextlib.suppress(StopForward):
                    model.get_decoder()(**inputs, use_cache=False)
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
    nbytes = sum(h.numel() * h.element_size() for h in hidden)
    storage = stream_storage(device, nbytes)
    return Stream([h.to(storage) for h in hidden], [b["attention_mask"].bool().to(storage) for b in batches],
                  kwargs, list(groups) if groups is not None else [0] * len(batches), storage)


@contextlib.contextmanager
def _embedding_for(weights: Weights, batches: list[dict[str, torch.Tensor]]):
    """The input embedding, ready for these batches, and how their token ids map into it. Streamed from
    the files, it holds only the rows of the tokens the batches use (a vocabulary-sized matrix is never
    read whole: 4 GB in float32 at Llama-3-70B's size), the ids renumbered to match."""
    if not weights.streamed(weights.embedding):
        with weights.onloaded(weights.embedding) as embedding:
            yield embedding, lambda ids: ids
        return
    ids = [torch.zeros(1, dtype=torch.long), *(b["input_ids"].reshape(-1) for b in batches)]
    used = torch.cat(ids).unique()  # ascending
    embedding = weights.model.get_submodule(weights.embedding)
    full = embedding.weight  # on meta; its shape is the model's
    embedding.weight = nn.Parameter(weights.gather(f"{weights.embedding}.weight", used), requires_grad=False)
    try:
        yield embedding, lambda ids: torch.searchsorted(used, ids)
    finally:
        embedding.weight = full


def stream_storage(device: torch.device, nbytes: int) -> torch.device:
    """Where calibration hidden states are kept: on the accelerator when four copies (a dense and a
    pruned stream, and their intermediates) take at most half its free memory, else in host memory."""
    if device.type == "cuda" and 4 * nbytes <= torch.cuda.mem_get_info(device)[0] // 2:
        return device
    return torch.device("cpu")


def run_module(layer: nn.Module, block: SubBlock, normed: torch.Tensor, kwargs: dict,
               writer_input: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """The attention or MLP of a sub-block on its normalised input: the writer's output. `writer_input`
    sees the writer's input; raising StopForward there ends the call early (None is returned)."""
    handle = None if writer_input is None else layer.get_submodule(block.writer).register_forward_pre_hook(
        lambda _module, args: writer_input(args[0]))
    module = layer.get_submodule(block.module)
    try:
        out = module(hidden_states=normed, **kwargs) if block.attention else module(normed)
    except StopForward:
        return None
    finally:
        if handle is not None:
            handle.remove()
    return out[0] if isinstance(out, tuple) else out


def run_sub_block(layer: nn.Module, block: SubBlock, hidden: torch.Tensor, kwargs: dict,
                  tap: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """h + output_norm(module(norm(h))): one sub-block of a decoder layer; `tap(site, x)` sees the
    normalised input ("norm_output") and the writer's input ("writer_input")."""
    normed = layer.get_submodule(block.norm)(hidden)
    if tap is not None:
        tap("norm_output", normed)
    out = run_module(layer, block, normed, kwargs, None if tap is None else lambda z: tap("writer_input", z))
    if block.output_norm:
        out = layer.get_submodule(block.output_norm)(out)
    return hidden + out


def run_layer(layer: nn.Module, adapter: Adapter, hidden: torch.Tensor, kwargs: dict,
              tap: Callable[[int, str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """A decoder layer as its sub-blocks; `tap(sub_block_index, site, x)`."""
    for index, block in enumerate(adapter.sub_blocks):
        hidden = run_sub_block(layer, block, hidden, kwargs,
                               None if tap is None else lambda site, x, i=index: tap(i, site, x))
    return hidden


class Observer:
    """What a pass learns from: a method's statistics. `sites` says what it taps; the engine calls
    `block` when block i's weights are on its device, `observe` for every batch at every tapped site
    (x holds the real tokens only: (tokens, width)), and `block_done` after the block's last batch.
    The stream entering "block" n (the number of blocks) is the final norm's input."""

    sites: frozenset[str] = frozenset()

    def block(self, index: int, layer: nn.Module) -> None:
        """Block `index`'s weights, on the device it computes on."""

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        """`x` at `site` of block `index` (sub-block `sub` for the sites inside a block)."""

    def block_done(self, index: int, layer: nn.Module) -> None:
        """Every batch has been through block `index`."""


@torch.inference_mode()
def observe(weights: Weights, stream: Stream, observers: list[Observer], desc: str = "calibrate") -> None:
    """One pass over the blocks: each brought to its compute device once, every batch of `stream` run
    through it with the observers' taps, its outputs the next block's inputs. `stream` advances in
    place, ending as the final norm's input; with no batches the pass only shows each block's weights."""
    sites = frozenset().union(*(o.sites for o in observers))
    blocks = weights.blocks
    inside = sites & {"norm_output", "writer_input"}
    for i in progress(range(len(blocks)), desc=desc, unit="block"):
        with weights.onloaded(f"{weights.adapter.layers}.{i}") as layer:
            device = weights.device_of(layer)
            for observer in observers:
                observer.block(i, layer)
            for b in range(len(stream)):
                def tap(sub: int | None, site: str, x: torch.Tensor, i=i, b=b) -> None:
                    if site in sites:
                        real = stream.real(b, x)
                        for observer in observers:
                            if site in observer.sites:
                                observer.observe(i, site, sub, real, stream.groups[b])

                hidden = stream.hidden[b].to(device)
                tap(None, "block_input", hidden)
                hidden = run_layer(layer, weights.adapter, hidden, to_device(stream.kwargs[b][i], device),
                                   tap if inside else None)
                tap(None, "block_output", hidden)
                stream.hidden[b] = hidden.to(stream.storage)
            for observer in observers:
                observer.block_done(i, layer)
    if "block_input" in sites:
        for b in range(len(stream)):
            real = stream.real(b, stream.hidden[b])
            for observer in observers:
                if "block_input" in observer.sites:
                    observer.observe(len(blocks), "block_input", None, real, stream.groups[b])
