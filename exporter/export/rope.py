"""Rotary embeddings the TorchScript tracer can follow: dynamic-NTK RoPE computed from the call's positions.

`rope_scaling` types that only change the frequencies at construction (linear, llama3, yarn) trace as
constants and need nothing here. Dynamic NTK (`rope_type: "dynamic"`) changes them at run time: HF's
`dynamic_rope_update` decides in Python (`if seq_len > max_seq_len_cached`) whether to recompute
`inv_freq` for `seq_len = max(position_ids) + 1`, and a trace would bake whichever branch the example
took, so past `max_position_embeddings` the ONNX would silently use the unscaled frequencies.

`traceable_rotary(module)` swaps every dynamic rotary embedding inside `module` for one that computes
the frequencies with HF's own function (`ROPE_INIT_FUNCTIONS["dynamic"]`, tensor arithmetic when given
a tensor `seq_len`) from every call's positions, and puts the original back afterwards. It equals HF's
stateful module whenever the sequence only grows, as in one generation (prefill, then decode steps:
each call's frequencies from its own total length; cached keys keep the rotation they were written
with, as in HF). It differs only where HF's module state leaks across calls: a later, shorter sequence
that is still longer than `max_position_embeddings` reuses the longest sequence's frequencies in HF.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def is_dynamic_rotary(module: nn.Module) -> bool:
    """An HF rotary embedding whose frequencies depend on the sequence length at run time."""
    rope_type = getattr(module, "rope_type", None)
    return isinstance(rope_type, str) and "dynamic" in rope_type and hasattr(module, "original_inv_freq")


class StatelessDynamicRotary(nn.Module):
    """HF's dynamic-NTK rotary embedding without module state: `inv_freq` from this call's positions."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary: Any = self.rotary
        seq_len = torch.max(position_ids) + 1
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rotary.rope_type](rotary.config, x.device, seq_len=seq_len)
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)


@contextmanager
def traceable_rotary(module: nn.Module) -> Iterator[int]:
    """Inside the block, dynamic rotary embeddings of `module` are `StatelessDynamicRotary`; yields
    how many were swapped."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_dynamic_rotary(child):
                setattr(parent, name, StatelessDynamicRotary(child))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
