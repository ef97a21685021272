"""Pruning masks: read them in any of the MODEL_DIR contract's three forms, validate, apply.

Forms: (a) `pruning_masks.safetensors` (parameter name -> 0/1 mask of the parameter's shape or
broadcastable to it, e.g. `[out, 1]` for rows); (b) torch.nn.utils.prune's `<name>_orig` +
`<name>_mask` pairs inside the weights; (c) zeros already multiplied into the weights.

A mask is kept as a float 0/1 tensor *viewed* at the parameter's full shape (`torch.broadcast_to`,
so a row mask costs one column of memory); masks read from zeros in the weights are bool. The reference semantics are
effective weight = (W + scaling·B·A) ⊙ mask: masks are applied after the LoRA merge, which is why
form (c) still yields masks, since an adapter would otherwise revive the zeroed entries.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from export_errors import InputError
from exporter.model_dir.files import read_safetensors

logger = logging.getLogger(__name__)

MASKS_FILE = "pruning_masks.safetensors"
PRUNE_ORIG, PRUNE_MASK = "_orig", "_mask"


def validate_mask(mask: torch.Tensor, name: str, shape: torch.Size, where: str | Path) -> torch.Tensor:
    """A float 0/1 mask broadcast to `shape`, or an InputError naming the file, tensor and problem."""
    if mask.dtype.is_complex or not (mask.dtype == torch.bool or mask.is_floating_point() or _is_int(mask)):
        raise InputError(where, f"mask {name!r}: dtype {mask.dtype} is not bool, integer or float")
    values = mask.to(torch.float32)
    if torch.isnan(values).any():
        raise InputError(where, f"mask {name!r} contains NaN")
    bad = values[(values != 0) & (values != 1)]
    if bad.numel():
        raise InputError(where, f"mask {name!r} has values other than 0/1 (e.g. {bad[0].item():g})")
    if not _broadcasts_to(tuple(mask.shape), tuple(shape)):
        raise InputError(
            where,
            f"mask {name!r} has shape {list(mask.shape)}, neither the parameter's shape {list(shape)} "
            "nor broadcastable to it (e.g. [out, 1] for rows, [1, in] for columns)",
        )
    return torch.broadcast_to(values, shape)


def _is_int(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _broadcasts_to(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(mask_shape) > len(shape):
        return False
    padded = (1,) * (len(shape) - len(mask_shape)) + mask_shape
    return all(m in (1, s) for m, s in zip(padded, shape))


def read_mask_file(
    path: Path,
    shapes: Mapping[str, torch.Size],
    normalize: Callable[[str], str | None],
) -> dict[str, torch.Tensor]:
    """Masks from a `pruning_masks.safetensors`, keyed by the model's parameter names, validated."""

    masks: dict[str, torch.Tensor] = {}
    for raw_name, mask in read_safetensors(path).items():
        name = normalize(raw_name)
        if name is None or name not in shapes:
            raise InputError(
                path, f"mask {raw_name!r} names no parameter of the model{_hint(raw_name, shapes)}"
            )
        masks[name] = validate_mask(mask, raw_name, shapes[name], path)
    return masks


def _hint(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def split_prune_pairs(
    weights: dict[str, torch.Tensor], where: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """torch.nn.utils.prune's `<name>_orig` / `<name>_mask` pairs -> (`<name>` = the unmasked weight, masks).

    Validation of the masks against the parameter shapes happens with the other forms' masks."""
    origs = {k[: -len(PRUNE_ORIG)] for k in weights if k.endswith(PRUNE_ORIG)}
    masks_of = {k[: -len(PRUNE_MASK)] for k in weights if k.endswith(PRUNE_MASK)}
    for name in sorted(origs ^ masks_of):
        have, lack = (PRUNE_ORIG, PRUNE_MASK) if name in origs else (PRUNE_MASK, PRUNE_ORIG)
        raise InputError(
            where, f"tensor {name + have!r} has no matching {name + lack!r} (torch.nn.utils.prune pair)"
        )
    paired = {name + suffix for name in origs for suffix in (PRUNE_ORIG, PRUNE_MASK)}
    resolved = {k: v for k, v in weights.items() if k not in paired}
    masks: dict[str, torch.Tensor] = {}
    for name in sorted(origs):
        if name in resolved:
            raise InputError(where, f"tensor {name!r} is stored both plainly and as a prune pair")
        resolved[name] = weights[name + PRUNE_ORIG]
        masks[name] = weights[name + PRUNE_MASK]
    return resolved, masks


def masks_from_zeros(
    weights: Mapping[str, torch.Tensor], linear_weights: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Form (c): a mask for every linear weight holding exact zeros (kept zero after a LoRA merge).
    Bool, one byte per entry: an fp32 mask would be twice the size of the bf16 weight it masks."""
    masks = {}
    for name in linear_weights:
        weight = weights.get(name)
        if weight is not None and not bool(weight.all()):
            masks[name] = weight != 0
    return masks


def combine(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both mask forms present: an entry is pruned if either form prunes it."""
    combined = dict(first)
    for name, mask in second.items():
        combined[name] = combined[name] * mask if name in combined else mask
    return combined


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Multiply each mask into its parameter in place; returns the number of entries zeroed by masks."""
    params = dict(model.named_parameters(remove_duplicate=False))
    zeroed = 0
    for name, mask in masks.items():
        param = params.get(name)
        if param is None:
            raise InputError(MASKS_FILE, f"mask {name!r} names no parameter of the built model")
        param.mul_(mask.to(param.dtype))
        zeroed += int((mask == 0).sum())
    logger.info("applied %d masks (%d entries masked)", len(masks), zeroed)
    return zeroed
