"""Registry of architecture families, keyed by Hugging Face `model_type`.

A family is one small module with: MODEL_TYPES, `layers(model)`, `set_layer(model, index, layer)`,
`head_dim(model)`, `plan_layer(layer, index, head_dim) -> LayerPlan`, `apply_layer(layer, plan, head_dim)
-> layer` (fold then slice; the returned layer replaces the old one when a whole sublayer is gone),
`resize_layer(layer, shapes, head_dim) -> layer` (allocate compact shapes for reloading),
`finish_model(model)` (model-level bookkeeping, e.g. KV-cache slots) and `layer_params(layer)`.
Layers with a whole sublayer removed are built from `sublayers`. Adding a family = adding a module here
and to FAMILIES.
"""

from __future__ import annotations

from types import ModuleType

from export_errors import InputError
from exporter.restructure.families import bert, llama

FAMILIES: tuple[ModuleType, ...] = (bert, llama)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.MODEL_TYPES)


def family_for(model_type: str, where: str = "config.json") -> ModuleType:
    """The family module for `model_type`, or an InputError listing the supported ones."""
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    raise InputError(
        where, f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


def is_decoder(model_type: str) -> bool:
    return model_type in llama.MODEL_TYPES
