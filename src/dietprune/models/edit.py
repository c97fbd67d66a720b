"""Stock models with edited shapes: one way to change a config, rebuild a model around a state dict,
read head_dim, name the embedding and the head, and count parameters."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from dietprune.errors import DietError, first_line


def head_dim(config) -> int:
    """Per-head width: the config's explicit head_dim, else hidden_size / heads (the transformers rule)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def embedding_names(model: nn.Module) -> tuple[str, str]:
    """The module names of the input embedding and of the LM head (two modules even where they share one
    weight)."""
    names = {module: name for name, module in model.named_modules()}
    return names[model.get_input_embeddings()], names[model.get_output_embeddings()]


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def edited_config(config, changes: dict):
    """A new config of the same class with `changes` applied, validated like a loaded one. head_dim is
    written out first, so it survives a change of hidden_size or head count. A config the class rejects
    (transformers checks e.g. hidden_size % heads) is a one-line DietError."""
    values = config.to_dict() | {"head_dim": head_dim(config)} | changes
    try:
        return config.__class__.from_dict(values)
    except (ValueError, StrictDataclassError) as exc:
        raise DietError(f"transformers rejects the edited {config.model_type} config "
                        f"({', '.join(f'{k}={v}' for k, v in changes.items())}): "
                        f"{first_line(exc)}") from exc


def accepts(config, changes: dict) -> bool:
    """Whether the config class validates with `changes`."""
    try:
        edited_config(config, changes)
    except DietError:
        return False
    return True


def meta_model(config, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A stock model of `config` on the meta device (no memory; its buffers real, built from the config):
    for shapes, parameter counts, and as the frame weights are assigned into."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    return model


def rebuild(config, state: dict[str, torch.Tensor], dtype: torch.dtype, partial: str | None = None
            ) -> PreTrainedModel:
    """A stock model built from `config` holding `state`, loaded strictly (every key, every shape) and
    without copies: parameters start on "meta" and are assigned the given tensors. With `partial`, the
    tensors under that prefix may be missing: they stay on "meta" until the caller assigns them."""
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are built from the config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # a tensor made under inference mode (accelerate onloads offloaded weights as such) cannot become a
    # Parameter: those few are copied
    state = {name: t.clone() if t.is_inference() else t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=partial is None, assign=True)
    if unexpected or any(not name.startswith(partial) for name in missing):
        raise RuntimeError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
