"""Mask validation, the torch.nn.utils.prune form, zeros found in weights, and applying masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export_errors import InputError
from exporter.model_dir.masks import apply_masks_, combine, masks_from_zeros, split_prune_pairs, validate_mask

SHAPE = torch.Size([4, 3])


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1], [0], [1], [1]], dtype=torch.bool),
        torch.tensor([[1], [0], [1], [1]], dtype=torch.uint8),
        torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float16),
        torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.int64),
    ],
)
def test_valid_masks_become_float_at_full_shape(mask: torch.Tensor) -> None:
    full = validate_mask(mask, "w", SHAPE, "m.safetensors")
    assert full.shape == SHAPE and full.dtype == torch.float32
    assert full.sum(dim=1).tolist() == [3, 0, 3, 3]


def test_column_mask_broadcasts() -> None:
    full = validate_mask(torch.tensor([[1, 0, 1]]), "w", SHAPE, "m")
    assert full[:, 1].sum() == 0 and full.sum() == 8
    assert validate_mask(torch.tensor([1, 0, 1]), "w", SHAPE, "m").sum() == 8


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (torch.ones(3, 1), "shape [3, 1]"),
        (torch.ones(1, 4, 3), "shape [1, 4, 3]"),
        (torch.tensor([[1.0], [0.0], [2.0], [1.0]]), "other than 0/1 (e.g. 2)"),
        (torch.tensor([[1.0], [-1.0], [1.0], [1.0]]), "other than 0/1 (e.g. -1)"),
        (torch.tensor([[1.0], [float("nan")], [1.0], [1.0]]), "NaN"),
        (torch.ones(4, 1, dtype=torch.complex64), "dtype"),
    ],
)
def test_invalid_masks(mask: torch.Tensor, words: str) -> None:
    with pytest.raises(InputError, match="mask 'w'") as info:
        validate_mask(mask, "w", SHAPE, "masks.safetensors")
    assert words in info.value.problem and info.value.where == "masks.safetensors"


def test_split_prune_pairs() -> None:
    weights = {"a.weight_orig": torch.ones(2, 2), "a.weight_mask": torch.eye(2), "a.bias": torch.ones(2)}
    resolved, masks = split_prune_pairs(weights, "w.safetensors")
    assert set(resolved) == {"a.weight", "a.bias"} and torch.equal(resolved["a.weight"], torch.ones(2, 2))
    assert set(masks) == {"a.weight"} and torch.equal(masks["a.weight"], torch.eye(2))


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ({"a.weight_orig": torch.ones(1)}, "'a.weight_orig' has no matching 'a.weight_mask'"),
        ({"a.weight_mask": torch.ones(1)}, "'a.weight_mask' has no matching 'a.weight_orig'"),
        ({"a.weight": torch.ones(1), "a.weight_orig": torch.ones(1), "a.weight_mask": torch.ones(1)}, "both"),
    ],
)
def test_broken_prune_pairs(weights: dict, words: str) -> None:
    with pytest.raises(InputError) as info:
        split_prune_pairs(weights, "w.safetensors")
    assert words in info.value.problem


def test_masks_from_zeros_only_where_zeros_are() -> None:
    weights = {
        "a.weight": torch.tensor([[1.0, 0.0], [2.0, 3.0]]),
        "b.weight": torch.ones(2, 2),
        "c.bias": torch.zeros(2),
    }
    masks = masks_from_zeros(weights, ["a.weight", "b.weight"])
    assert list(masks) == ["a.weight"] and masks["a.weight"].tolist() == [[1, 0], [1, 1]]


def test_combine_prunes_what_either_prunes() -> None:
    both = combine(
        {"a": torch.tensor([1.0, 0.0, 1.0])}, {"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.ones(1)}
    )
    assert both["a"].tolist() == [1, 0, 0] and set(both) == {"a", "b"}


def test_apply_masks_in_place() -> None:
    layer = nn.Linear(3, 4)
    mask = validate_mask(torch.tensor([[1], [0], [1], [0]]), "weight", layer.weight.shape, "m")
    zeroed = apply_masks_(layer, {"weight": mask})
    assert zeroed == 6 and (layer.weight[[1, 3]] == 0).all() and (layer.weight[[0, 2]] != 0).all()
    with pytest.raises(InputError, match="names no parameter"):
        apply_masks_(layer, {"nope.weight": mask})
