"""Mistral: Llama's residual anatomy (sliding-window attention does not touch it)."""

from dataclasses import replace

from dietprune.models.adapters.llama import ADAPTER as LLAMA

ADAPTER = replace(LLAMA, name="mistral", model_types=("mistral",))
