"""Placement: where the model runs and in which dtype, decided in one place."""

from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embedding."""
    return model.get_input_embeddings().weight.device


def compute_dtype(name: str) -> torch.dtype:
    """The dtype a model is loaded and run in: "auto" is float32 (see RuntimeSettings.dtype)."""
    return torch.float32 if name == "auto" else getattr(torch, name)
