"""A pruned model assembled block by block: an `Edit` says what each block's tensors become, a sink puts
the result in memory (`MemorySink`), straight into checkpoint files (`FileSink`), or nowhere (`DiscardSink`,
the data-parallel processes after the first).

Every method ends in an edit (DIET's slice, ShortGPT's dropped layers, Wanda-SP's cut heads and channels,
SliceGPT's rotation), applied by one loop that brings each dense block to the compute device once: a
model whose weights exceed host memory is pruned from its files into its output files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from dietprune.models.adapters import adapter_for
from dietprune.models.edit import meta_model
from dietprune.models.store import Checkpoint, CheckpointWriter, Transform
from dietprune.progress import progress
from dietprune.sequential import Weights, has_meta

State = dict[str, torch.Tensor]
ROWS = 1 << 14  # vocabulary rows per block of a streamed embedding or head
FLUSH_BYTES = 256 << 20  # a streamed prune's shard is written once it holds this much: the host copies
# of a block in the saved dtype stay below a few hundred MB (a whole 70B block would be 1.4 GB)


@dataclass(frozen=True)
class Edit:
    """A method's change to a model. `config`: the pruned model's; `block(i, state)`: block i's new
    state (names relative to the block), or None to drop the block; `rest(name, tensor)`: what a tensor
    outside the blocks becomes. Edits may reuse their inputs' memory (the dense tensors are not used
    again); `in_place` says whether they do."""

    config: object
    block: Callable[[int, State], State | None]
    rest: Callable[[str, torch.Tensor], torch.Tensor]


class MemorySink:
    """Builds the pruned model in memory: a stock model of `config` whose tensors are assigned as the
    blocks are edited. `into_dense`: each new block is then moved into the front of the dense block's
    memory (recovery: the dense model is destroyed, memory holds one model plus one block)."""

    def __init__(self, config, dtype: torch.dtype, into_dense: bool = False):
        self.model, self.dtype = meta_model(config, dtype), dtype
        self.layers = self.model.get_submodule(adapter_for(config).layers)
        self.into_dense = into_dense

    def block(self, index: int, state: State, dense: nn.Module | None = None) -> None:
        if self.into_dense and dense is not None and not has_meta(dense):
            own = dense.state_dict()
            state = {name: _into(own[name], t) if name in own else t for name, t in state.items()}
        self.layers[index].load_state_dict(_assignable(state), strict=True, assign=True)

    def rest(self, name: str, tensor: torch.Tensor) -> None:
        module, _, key = name.rpartition(".")
        self.model.get_submodule(module).load_state_dict({key: _assignable({key: tensor})[key]}, strict=False,
                                                         assign=True)

    def finish(self) -> PreTrainedModel:
        model = self.model
        if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise RuntimeError(f"the edit left tensors unassigned: {missing[:4]}")
        device = next(model.parameters()).device
        for module in model.modules():  # buffers where the weights are (rotary tables, embedding scales)
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        return model.eval()


class FileSink:
    """Writes the pruned model (config and tensors) into `directory` as its blocks come, in the dtype and
    the serving form it is saved in (models/serving.py): memory holds one block of it at a time."""

    def __init__(self, directory: Path, config, dtype: torch.dtype, generation: GenerationConfig | None):
        self.directory, self.dtype, self.generation = Path(directory), dtype, generation
        self.pruned_config = config
        self.config, transform, self.saved_as = serving_form(config)
        self.writer = CheckpointWriter(self.directory, dtype, transform, shard_bytes=FLUSH_BYTES)
        self.layers = adapter_for(config).layers

    def block(self, index: int, state: State, dense: nn.Module | None = None) -> None:
        for name, tensor in state.items():
            self.writer.add(f"{self.layers}.{index}.{name}", tensor)
        self.writer.flush()  # shards never straddle blocks

    def rest(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def finish(self) -> Checkpoint:
        self.writer.close()
        write_config(self.config, self.directory, self.dtype, self.generation)
        return Checkpoint(self.directory)


class DiscardSink:
    """Keeps nothing: under torchrun the processes after the first compute the same refit blocks (each
    carries the process's calibration shard on) and leave the model to the first, so N processes
    neither write N checkpoints nor hold N models; nothing else (the embedding, a plain slice's blocks)
    is even read for it."""

    def __init__(self, config):
        self.pruned_config = config

    def block(self, index: int, state: State, dense: nn.Module | None = None) -> None:
        pass

    def finish(self) -> None:
        return None


Sink = MemorySink | FileSink | DiscardSink


def assemble(weights: Weights, edit: Edit, sink: Sink, desc: str = "slice") -> None:
    """Apply `edit` block by block (each dense block brought to its device once) and then to every
    tensor outside the blocks, handing each result to `sink` (nothing is read for a DiscardSink)."""
    if isinstance(sink, DiscardSink):
        return
    new_index = 0
    for i in progress(range(len(weights.blocks)), desc=desc, unit="block"):
        with weights.onloaded(f"{weights.adapter.layers}.{i}") as layer:
            state = edit.block(i, layer.state_dict())
            if state is not None:
                sink.block(new_index, state, layer)
                new_index += 1
            del state  # a streamed block's tensors go with the block, before the next one is read
    apply_rest(weights, edit, sink)


def apply_rest(weights: Weights, edit: Edit, sink: Sink,
               then: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """`edit.rest` on every tensor outside the blocks (`then` after it, e.g. a refit), into `sink`. A
    streamed vocabulary-sized matrix is edited a block of rows at a time (so `rest` must act on rows
    independently, as slicing columns and rotating rows do) into one tensor in the saved dtype. Nothing
    is read for a DiscardSink."""
    if isinstance(sink, DiscardSink):
        return
    for name, tensor in rest_tensors(weights, edit.config):
        if isinstance(tensor, Rows):
            out, start = None, 0
            for rows in tensor.chunks():
                rows = edit.rest(name, rows).to("cpu", sink.dtype)
                if out is None:
                    out = torch.empty(tensor.count, *rows.shape[1:], dtype=rows.dtype)
                out[start:start + len(rows)] = rows
                start += len(rows)
            sink.rest(name, out)
            del out  # written: not held while the next matrix is read
            continue
        tensor = edit.rest(name, tensor)
        sink.rest(name, then(name, tensor) if then else tensor)


def applied(model: PreTrainedModel, edit: Edit, desc: str = "edit") -> PreTrainedModel:
    """`edit` applied to a model in memory (or offloaded by accelerate): the edited model, in memory."""
    weights = Weights.of(model)
    sink = MemorySink(edit.config, weights.dtype)
    assemble(weights, edit, sink, desc)
    return sink.finish()


def serving_form(config) -> tuple[object, Transform | None, dict | None]:
    """(the config saved, the transform of each tensor, the note recorded as "saved_as"): the form the
    serving engines run (models/serving.py), or the model as it is."""
    serving = adapter_for(config).serving
    rewrite = serving(config) if serving else None
    return rewrite if rewrite is not None else (config, None, None)


def write_config(config, directory: Path, dtype: torch.dtype, generation: GenerationConfig | None) -> None:
    """config.json (with the saved dtype and the model class, as save_pretrained writes them) and the
    generation config (the source model's)."""
    config = copy.deepcopy(config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.save_pretrained(directory)
    if generation is not None:
        generation.save_pretrained(directory)


def save_model(weights: Weights, directory: Path, dtype: torch.dtype) -> dict | None:
    """Write a model's checkpoint into `directory`, one tensor at a time (each converted to `dtype` on
    the host as it is written; no converted copy of the model), in its serving form. Returns the
    "saved_as" note of that form, if any."""
    config, transform, note = serving_form(weights.model.config)
    writer = CheckpointWriter(directory, dtype, transform)
    for i in range(len(weights.blocks)):
        name = f"{weights.adapter.layers}.{i}"
        for key, tensor in weights.tensors(name):
            writer.add(key, tensor)
    for key, tensor in rest_tensors(weights, weights.model.config):
        writer.add(key, tensor)
    writer.close()
    write_config(config, directory, dtype, getattr(weights.model, "generation_config", None))
    return note


@dataclass(frozen=True)
class Rows:
    """A streamed vocabulary-sized matrix: `count` rows, read a block at a time by `chunks()`."""

    count: int
    chunks: Callable[[], Iterator[torch.Tensor]]


def rest_tensors(weights: Weights, config) -> Iterator[tuple[str, torch.Tensor | Rows]]:
    """(name, tensor) of every tensor outside the blocks, one module onloaded at a time; a head tied to
    the embedding (in the pruned `config`) is the embedding's, so it is skipped. A streamed embedding or
    head comes as `Rows`."""
    model, prefix = weights.model, weights.adapter.layers + "."
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if name == weights.adapter.layers or name.startswith(prefix):
            continue
        own = [k for k in module.state_dict(keep_vars=True) if "." not in k]
        if not own or (tied and name == weights.head):
            continue
        if name in (weights.embedding, weights.head) and weights.streamed(name) and own == ["weight"]:
            key = f"{name}.weight"
            yield key, Rows(module.weight.shape[0], lambda key=key: weights.rows(key, ROWS))
            continue
        with weights.onloaded(name) as onloaded:
            state = onloaded.state_dict()
            for key in own:
                yield f"{name}.{key}" if name else key, state[key]


def _assignable(state: State) -> State:
    """A tensor made under inference mode (accelerate onloads offloaded weights as such) cannot become a
    Parameter: those few are copied."""
    return {name: t.clone() if t.is_inference() else t for name, t in state.items()}


def _into(memory: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` written over the front of `memory` (a larger tensor of the same dtype and device), as a
    view of it; `values` itself where `memory` cannot take it."""
    if not memory.is_contiguous() or memory.dtype != values.dtype or memory.device != values.device \
            or memory.numel() < values.numel() or memory.data_ptr() == values.data_ptr():
        return values
    front = memory.view(-1)[:values.numel()].view(values.shape)
    return front.copy_(values)
