"""Checkpoints pruned by transformers 4's `model.prune_heads(...)`: config.json `pruned_heads` and smaller layers.

transformers 4 saved such a model with `"pruned_heads": {"0": [1, 2]}` (layer -> original head indices) and
physically smaller tensors in those layers: query/key/value lose the heads' rows, the attention output
projection their columns; `num_attention_heads` in config.json stays the original count. transformers 5
removed `prune_heads`, so we allocate those layers at their saved width (the remaining heads keep their
order) and the checkpoint loads as the non-uniform compact model it is; masks and LoRA, shaped for that
model, apply on top. Only BERT-style encoders had `prune_heads` among the supported families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from export_errors import InputError

PRUNING_FAMILIES = ("bert", "roberta")


def read_pruned_heads(config: Any, where: Path | str) -> dict[int, list[int]]:
    """config.json's `pruned_heads` as {layer: sorted original head indices}, checked; {} when absent."""
    raw = getattr(config, "pruned_heads", None) or {}
    if not raw:
        return {}
    if config.model_type not in PRUNING_FAMILIES:
        raise InputError(
            where, f"pruned_heads is a transformers 4 BERT-style field; {config.model_type} has none"
        )
    if not isinstance(raw, dict):
        raise InputError(where, 'pruned_heads must map a layer index to a list of heads, e.g. {"0": [1, 2]}')
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    pruned: dict[int, list[int]] = {}
    for key, value in raw.items():
        layer = _index(key, layers, f"pruned_heads layer {key!r}", where)
        if not isinstance(value, list):
            raise InputError(where, f"pruned_heads[{key!r}] must be a list of head indices")
        chosen = sorted({_index(h, heads, f"pruned_heads[{key!r}] head {h!r}", where) for h in value})
        if len(chosen) == heads:
            raise InputError(where, f"pruned_heads[{key!r}] removes every head of layer {layer}")
        if chosen:
            pruned[layer] = chosen
    return pruned


def _index(value: Any, limit: int, what: str, where: Path | str) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if isinstance(value, bool) or index < 0 or index >= limit or str(index) != str(value).strip():
        raise InputError(where, f"{what} is not an index below {limit}")
    return index


@torch.no_grad()
def apply_pruned_heads(model: nn.Module, pruned: dict[int, list[int]]) -> None:
    """Allocate each pruned layer's attention at its saved width (weights are loaded next)."""
    if not pruned:
        return
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), model)
    for index, heads in pruned.items():
        attention = base.encoder.layer[index].attention
        self_attn, output = attention.self, attention.output
        head_dim = int(self_attn.attention_head_size)
        kept = int(self_attn.num_attention_heads) - len(heads)
        hidden, width = self_attn.query.in_features, kept * head_dim
        self_attn.query = _like(self_attn.query, hidden, width)
        self_attn.key = _like(self_attn.key, hidden, width)
        self_attn.value = _like(self_attn.value, hidden, width)
        output.dense = _like(output.dense, width, output.dense.out_features)
        self_attn.num_attention_heads = kept
        self_attn.all_head_size = width


def _like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    weight = linear.weight
    return nn.Linear(
        in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype
    )
