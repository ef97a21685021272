"""Save and reload the compact PyTorch model.

A plain HF config cannot describe layers with different head counts or FFN widths, so the compact
model is saved as: config.json (the original architecture), model.safetensors (compact weights)
and compact_shapes.json (per-layer shapes, head_dim, model class). `load_compact` rebuilds the
architecture, resizes each layer to its shapes and loads the weights strictly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import safetensors.torch
import transformers
from torch import nn

from export_errors import InputError
from exporter.restructure.plan import LayerShapes, RestructurePlan
from exporter.restructure.remove_dead import resize_to_plan

SHAPES_FILE = "compact_shapes.json"
WEIGHTS_FILE = "model.safetensors"


def save_compact(model: nn.Module, plan: RestructurePlan, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))
    manifest = {
        "model_class": type(model).__name__,
        "model_type": plan.model_type,
        "head_dim": plan.head_dim,
        "has_pooler": getattr(model, "pooler", None) is not None,
        "layers": [dataclasses.asdict(layer.shapes) for layer in plan.layers],
    }
    (directory / SHAPES_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def load_compact(directory: str | Path) -> nn.Module:
    """The compact model saved by `save_compact`, in eval mode with eager attention."""
    directory = Path(directory)
    manifest_path = directory / SHAPES_FILE
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: not a compact model folder saved by export-engine")
    manifest = json.loads(manifest_path.read_text())
    config = transformers.AutoConfig.from_pretrained(directory, attn_implementation="eager")
    model_class = getattr(transformers, manifest["model_class"], None)
    if model_class is None:
        raise InputError(manifest_path, f"unknown model class {manifest['model_class']!r}")
    model = model_class(config, **_constructor_kwargs(model_class, manifest["has_pooler"]))
    shapes = [LayerShapes(**layer) for layer in manifest["layers"]]
    resize_to_plan(model, shapes, manifest["head_dim"])
    safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.eval()


def _constructor_kwargs(model_class: type, has_pooler: bool) -> dict[str, bool]:
    parameters = inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": has_pooler} if "add_pooling_layer" in parameters else {}
