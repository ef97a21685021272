"""The restructure plan: per layer, what is kept, what is removed and why, params before/after.

The plan is pure data (JSON-serialisable) and is saved beside the export (`restructure_plan.json`).
Its `shapes` part is also the manifest that makes the compact model reloadable: a plain HF config
cannot describe layers with different head counts or FFN widths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class LayerShapes:
    """The compact shape of one layer: enough to allocate its modules before loading weights."""

    heads: int  # query heads (encoders: the only head count)
    kv_heads: int | None  # decoders with grouped-query attention; None for encoders
    ffn: int  # FFN width (intermediate neurons)
    attn_out_bias: bool  # the attention output projection has a bias (a decoder may gain one by folding)
    ffn_out_bias: bool  # the FFN down/output projection has a bias


@dataclasses.dataclass
class LayerPlan:
    """What happens to one layer. Indices refer to the original (unpruned) layer."""

    layer: int
    heads_kept: list[int]
    kv_heads_kept: list[int] | None
    neurons_kept: list[int]
    removed: dict[str, int]  # reason -> count of units removed for it
    notes: list[str]  # decisions worth telling the user (e.g. a dead query head kept inside a live group)
    shapes: LayerShapes
    params_before: int = 0
    params_after: int = 0


@dataclasses.dataclass
class RestructurePlan:
    model_type: str
    head_dim: int
    layers: list[LayerPlan]
    params_before: int = 0
    params_after: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestructurePlan:
        layers = [
            LayerPlan(**{**layer, "shapes": LayerShapes(**layer["shapes"])}) for layer in data["layers"]
        ]
        return cls(**{**data, "layers": layers})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RestructurePlan:
        return cls.from_json(json.loads(path.read_text()))

    def removed_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for layer in self.layers:
            for reason, count in layer.removed.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals
