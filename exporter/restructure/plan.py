"""The restructure plan: per layer, what is kept, what is removed and why, params and FLOPs before/after.

The plan is pure data (JSON-serialisable) and is saved beside the export (`restructure_plan.json`).
Its `shapes` part is also the manifest that makes the compact model reloadable: a plain HF config
cannot describe layers with different head counts or FFN widths.

A whole sublayer whose units all died is gone: `heads == 0` (and `kv_heads == 0` for decoders) means the
layer has no attention (no projections, no KV cache), `ffn == 0` no MLP; `attn_out_bias` / `ffn_out_bias`
then say whether the removed sublayer's constant output (its output bias plus folded constants) is kept,
added to the residual (pre-norm decoders) or fed to the LayerNorm (post-norm BERT). `LayerShapes.has_attention`
/ `has_mlp` and `LayerPlan.sublayers_removed` are what a graph builder needs to follow the plan.
FLOPs per token are in exporter/restructure/flops.py (the formula is there).
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

    @property
    def has_attention(self) -> bool:
        """False: the attention sublayer is removed (no projections, no attention, no KV cache)."""
        return self.heads > 0

    @property
    def has_mlp(self) -> bool:
        """False: the FFN / MLP sublayer is removed."""
        return self.ffn > 0


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
    # FLOPs per token of the layer's linear layers and attention ({"fixed", "per_context_token"}, see
    # exporter/restructure/flops.py), before and after; and those of the whole sublayers removed
    flops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    flops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    flops_saved_by_sublayer_removal: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def sublayers_removed(self) -> list[str]:
        """ "attention" and / or "mlp" when the whole sublayer is gone."""
        return [
            name
            for name, kept in (("attention", self.shapes.has_attention), ("mlp", self.shapes.has_mlp))
            if not kept
        ]


@dataclasses.dataclass
class RestructurePlan:
    model_type: str
    head_dim: int
    layers: list[LayerPlan]
    params_before: int = 0
    params_after: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for layer, plan in zip(data["layers"], self.layers):
            layer["sublayers_removed"] = plan.sublayers_removed
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestructurePlan:
        fields = {f.name for f in dataclasses.fields(LayerPlan)}
        layers = [
            LayerPlan(
                **{
                    **{k: v for k, v in layer.items() if k in fields},
                    "shapes": LayerShapes(**layer["shapes"]),
                }
            )
            for layer in data["layers"]
        ]
        return cls(**{**data, "layers": layers})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RestructurePlan:
        return cls.from_json(json.loads(path.read_text()))

    def sublayers_removed(self) -> dict[int, list[str]]:
        """Layer index -> the whole sublayers removed from it (only layers that lost one)."""
        return {layer.layer: layer.sublayers_removed for layer in self.layers if layer.sublayers_removed}

    def flops_saved_by_sublayer_removal(self) -> dict[str, int]:
        """Summed over layers: {"fixed", "per_context_token"} FLOPs per token of the removed sublayers."""
        return _sum_flops(layer.flops_saved_by_sublayer_removal for layer in self.layers)

    def flops_per_token(self) -> dict[str, dict[str, int]]:
        """{"before", "after"}: the layers' FLOPs per token, summed ({"fixed", "per_context_token"})."""
        return {
            "before": _sum_flops(layer.flops_before for layer in self.layers),
            "after": _sum_flops(layer.flops_after for layer in self.layers),
        }

    def removed_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for layer in self.layers:
            for reason, count in layer.removed.items():
                totals[reason] = totals.get(reason, 0) + count
        return totals


def _sum_flops(parts: Any) -> dict[str, int]:
    total = {"fixed": 0, "per_context_token": 0}
    for part in parts:
        for key in total:
            total[key] += int(part.get(key, 0))
    return total
