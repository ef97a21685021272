"""Slicing and folding helpers shared by the families: the only places that build new nn.Linear."""

from __future__ import annotations

import torch
from torch import nn


def zero_rows(weight: torch.Tensor) -> torch.Tensor:
    """Bool per output row: the row is exactly zero."""
    return (weight == 0).all(dim=1)


def zero_cols(weight: torch.Tensor) -> torch.Tensor:
    """Bool per input column: the column is exactly zero."""
    return (weight == 0).all(dim=0)


def bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype)


def sliced_linear(
    linear: nn.Linear,
    rows: list[int] | None = None,
    cols: list[int] | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> nn.Linear:
    """A new Linear keeping output `rows` and input `cols` of `weight` (default: the layer's own).
    `bias` (if given, full-length before slicing rows) replaces the bias: this gives a bias to a
    layer that had none when a removed unit's constant is folded into it."""
    weight = linear.weight.detach() if weight is None else weight
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    if bias is None and linear.bias is not None:
        bias = linear.bias.detach()
    if bias is not None and rows is not None:
        bias = bias[rows]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def empty_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    """A Linear of the compact shape, to be filled by load_state_dict (reloading a compact model)."""
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def head_slices(heads: list[int], head_dim: int) -> list[int]:
    """Row (or column) indices of whole heads."""
    return [h * head_dim + k for h in heads for k in range(head_dim)]


def linear_params(*linears: nn.Linear) -> int:
    return sum(p.numel() for linear in linears for p in linear.parameters())
