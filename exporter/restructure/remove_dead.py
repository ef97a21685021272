"""Physically remove dead structure: plan per layer from the effective weights, then fold and slice.

`restructure(model)` mutates the masked+merged reference model into the compact one and returns
the plan. `resize_to_plan(model, shapes)` allocates a fresh model's compact shapes so a saved
compact model can be reloaded (see exporter/restructure/compact.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from exporter.restructure.families import family_for
from exporter.restructure.plan import LayerShapes, RestructurePlan

logger = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PRUNED_IN_CHECKPOINT = "heads: pruned in the checkpoint (config.json pruned_heads)"


@torch.no_grad()
def plan_restructure(model: nn.Module, pruned_heads: dict[int, list[int]] | None = None) -> RestructurePlan:
    """Find the dead units of every layer; pure: the model is not changed. `pruned_heads`: heads a
    transformers 4 checkpoint had already removed (its layers load at their smaller width), said per layer."""
    family = family_for(model.config.model_type)
    hd = family.head_dim(model)
    layers = [family.plan_layer(layer, i, hd) for i, layer in enumerate(family.layers(model))]
    for layer_plan in layers:
        heads = (pruned_heads or {}).get(layer_plan.layer)
        if heads:
            layer_plan.removed = {PRUNED_IN_CHECKPOINT: len(heads), **layer_plan.removed}
            layer_plan.notes.insert(
                0,
                f"heads {heads} were removed before export (transformers prune_heads, config.json pruned_heads); "
                "head indices in this plan count the heads the checkpoint kept",
            )
    return RestructurePlan(model.config.model_type, hd, layers, params_before=count_params(model))


@torch.no_grad()
def apply_plan(model: nn.Module, plan: RestructurePlan) -> None:
    """Fold and slice every layer; a layer that loses a whole sublayer may be replaced by the family."""
    family = family_for(model.config.model_type)
    for index, (layer, layer_plan) in enumerate(zip(family.layers(model), plan.layers)):
        compact = family.apply_layer(layer, layer_plan, plan.head_dim) or layer  # None: changed in place
        if compact is not layer:
            family.set_layer(model, index, compact)
        layer_plan.params_after = family.layer_params(compact)
    family.finish_model(model)
    plan.params_after = count_params(model)


def restructure(model: nn.Module, pruned_heads: dict[int, list[int]] | None = None) -> RestructurePlan:
    """Plan, then apply: the model becomes compact and computes the same function."""
    plan = plan_restructure(model, pruned_heads)
    apply_plan(model, plan)
    logger.info("restructure: %d -> %d parameters", plan.params_before, plan.params_after)
    for index, sublayers in plan.sublayers_removed().items():
        logger.info("restructure: layer %d: %s removed (every unit dead)", index, " and ".join(sublayers))
    return plan


def resize_to_plan(model: nn.Module, shapes: list[LayerShapes], head_dim: int) -> None:
    """Allocate per-layer compact shapes on a freshly built model (before load_state_dict)."""
    family = family_for(model.config.model_type)
    for index, (layer, layer_shapes) in enumerate(zip(family.layers(model), shapes)):
        compact = family.resize_layer(layer, layer_shapes, head_dim) or layer
        if compact is not layer:
            family.set_layer(model, index, compact)
    family.finish_model(model)
